"""plop.ranking.diff on real reports of tiny models: the diff is checked against values read straight off
the two reports' ``types``, never against plop's own arithmetic."""

from __future__ import annotations

import json

import pytest
from conftest import AlignedToy, make_batches, make_gpt2, make_llama
from rich.console import Console

from plop import Report, diagnose
from plop.ranking.diff import diff_reports
from plop.ranking.render import diff_table, plot_diff
from plop.errors import PlopError


def _llama_report(seq_len: int, seed: int) -> Report:
    return diagnose(make_llama(), make_batches(16, seq_len, seed=seed), top_k=3, rank=8, n_bootstrap=50)


@pytest.fixture(scope="module")
def short_report():
    return _llama_report(16, seed=7)


@pytest.fixture(scope="module")
def long_report():
    return _llama_report(24, seed=11)


@pytest.fixture(scope="module")
def toy_reports():
    """The aligned toy, and the same toy with its ``high`` and ``low`` weights swapped: the
    recommendation must trade ``low`` for ``high`` while ``mid``/``mid2`` stay put."""
    swapped = AlignedToy()
    for block in swapped.layers:
        block.high.weight.data, block.low.weight.data = block.low.weight.data.clone(), block.high.weight.data.clone()
    data = make_batches(16, 16)
    return [diagnose(model, data, top_k=3, n_bootstrap=20) for model in (AlignedToy(), swapped)]


def _text(renderable) -> str:
    console = Console(record=True, width=200)
    console.print(renderable)
    return console.export_text()


def _edited(report: Report, edit) -> Report:
    raw = report.to_dict()
    edit(raw)
    return Report.from_dict(raw)


def test_diff_of_two_data_sets_matches_the_reports(short_report, long_report):
    d = diff_reports(short_report, long_report, "short", "long")
    a = {t.type: t for t in short_report.types}
    b = {t.type: t for t in long_report.types}
    assert [t.type for t in d.types] == [t.type for t in short_report.types]
    for t in d.types:
        assert (t.nfn_a, t.nfn_b, t.rank_a, t.rank_b) == (a[t.type].nfn_mean, b[t.type].nfn_mean, a[t.type].position,
                                                          b[t.type].position)
        assert t.delta == pytest.approx(b[t.type].nfn_mean - a[t.type].nfn_mean, abs=1e-15)
        assert t.rank_change == b[t.type].position - a[t.type].position
        assert (t.recommended_a, t.recommended_b) == (t.type in short_report.recommendation.types,
                                                      t.type in long_report.recommendation.types)
    assert any(t.delta != 0 for t in d.types)  # two data sets really give two measurements
    rec_a, rec_b = set(short_report.recommendation.types), set(long_report.recommendation.types)
    assert (set(d.added), set(d.removed)) == (rec_b - rec_a, rec_a - rec_b)
    assert d.recommendation_changed == (rec_a != rec_b)
    assert d.only_in_a == d.only_in_b == [] and d.warnings == []
    assert json.loads(json.dumps(d.to_dict()))["types"][0]["type"] == short_report.types[0].type


def test_a_report_against_itself_is_all_zeros(short_report):
    d = diff_reports(short_report, short_report)
    assert all(t.delta == 0 and t.rank_change == 0 for t in d.types)
    assert not d.recommendation_changed and d.added == d.removed == []
    assert d.to_dict()["recommendation_changed"] is False
    assert "recommendation unchanged" in _text(diff_table(d))


def test_a_reordered_target_modules_list_is_no_change(short_report):
    reordered = _edited(short_report, lambda raw: raw["recommendation"]["target_modules"].reverse())
    assert not diff_reports(short_report, reordered).recommendation_changed


def test_hand_edited_module_moves_exactly_its_type(short_report):
    """Raise the lowest type's layer-0 module NFN by 1, recompute that report's type means and ranks
    here (mean over layers, ascending, ties by name), and diff."""
    edited_type = short_report.types[0].type

    def edit(raw):
        module = next(m for m in raw["modules"] if m["type"] == edited_type)
        module["nfn"] += 1.0
        for row in raw["types"]:
            values = [m["nfn"] for m in raw["modules"] if m["type"] == row["type"]]
            row["nfn_mean"] = sum(values) / len(values)
        for rank, row in enumerate(sorted(raw["types"], key=lambda r: (r["nfn_mean"], r["type"])), 1):
            row["position"] = rank

    edited = _edited(short_report, edit)
    d = diff_reports(short_report, edited)
    moved = {t.type: t for t in d.types if t.delta != 0}
    assert list(moved) == [edited_type]
    assert moved[edited_type].delta == pytest.approx(1.0 / short_report.types[0].n_modules)
    assert moved[edited_type].rank_change == len(short_report.types) - 1  # from first to last
    assert [t.rank_change for t in d.types if t.type != edited_type] == [-1] * (len(d.types) - 1)


def test_recommendation_change_between_two_toys(toy_reports):
    d = diff_reports(*toy_reports, "aligned", "swapped")
    assert (d.added, d.removed, d.recommendation_changed) == (["high"], ["low"], True)
    rows = {t.type: t for t in d.types}
    assert rows["mid"].delta == rows["mid2"].delta == 0  # same weights, same data
    assert rows["low"].delta == pytest.approx(-rows["high"].delta)
    text = _text(diff_table(d))
    assert "added high, removed low" in text
    assert "A: target_modules=['low', 'mid', 'mid2']" in text


def test_other_architecture_and_settings_are_warned_about(short_report, long_report):
    def edit(raw):
        raw["model"]["architecture"] = "MistralForCausalLM"
        raw["recommendation"]["rank"] = 32

    d = diff_reports(short_report, _edited(long_report, edit))
    assert len(d.warnings) == 2
    assert "LlamaForCausalLM vs MistralForCausalLM" in d.warnings[0]
    assert "r=8" in d.warnings[1] and "r=32" in d.warnings[1]
    assert "warning: different architectures" in _text(diff_table(d))


def test_types_in_one_report_only(short_report):
    def drop_v_proj(raw):
        raw["modules"] = [m for m in raw["modules"] if m["type"] != "v_proj"]
        raw["types"] = [t for t in raw["types"] if t["type"] != "v_proj"]

    d = diff_reports(short_report, _edited(short_report, drop_v_proj))
    assert (d.only_in_a, d.only_in_b) == (["v_proj"], [])
    row = next(t for t in d.types if t.type == "v_proj")
    assert (row.nfn_b, row.delta, row.rank_b, row.rank_change) == (None, None, None, None)
    assert "modules or shapes" in d.warnings[0]
    reverse = diff_reports(_edited(short_report, drop_v_proj), short_report)
    assert (reverse.only_in_a, reverse.only_in_b, reverse.types[-1].type) == ([], ["v_proj"], "v_proj")


def test_reports_without_a_shared_type_are_refused(short_report):
    gpt2 = diagnose(make_gpt2(), make_batches(8, 16), top_k=2, rank=8, n_bootstrap=10)
    with pytest.raises(PlopError, match="share no module type") as info:
        diff_reports(short_report, gpt2)
    assert "\n" not in str(info.value)


def test_plot_diff_draws_every_type_in_order(toy_reports, tmp_path):
    d = diff_reports(*toy_reports)
    fig = plot_diff(d, tmp_path / "diff.png")
    assert (tmp_path / "diff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [label.get_text() for label in fig.axes[0].get_yticklabels()] == [t.type for t in d.types]
