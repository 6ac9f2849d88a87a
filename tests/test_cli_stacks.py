"""``plop export --to``, ``plop diff`` and ``plop show --html`` through the real entry point."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest
import yaml

from conftest import AlignedToy, make_batches
from plop import Report, diagnose
from plop.stacks import FORMATS
from test_cli import one_line_error, run

pytestmark = pytest.mark.spawns  # each test here starts plop as a process


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Two reports of one toy model on two data sets, saved."""
    folder = tmp_path_factory.mktemp("reports")
    a = diagnose(AlignedToy(), make_batches(16, 12, seed=1), top_k=2, n_bootstrap=20, model_id="toy")
    b = diagnose(AlignedToy(), make_batches(16, 12, seed=2, vocab=40), top_k=2, n_bootstrap=20, model_id="toy")
    return a.save(folder / "a.json"), b.save(folder / "b.json")


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "peft"])
def test_export_to_every_stack_writes_what_the_api_exports(reports, tmp_path, fmt):
    from plop.placement import LoraSettings
    from plop.stacks import export

    out = tmp_path / "cfg"
    run("export", str(reports[0]), "--to", fmt, "--out", str(out), "--rank", "4")
    assert out.read_text() == export(Report.load(reports[0]), fmt, LoraSettings(4)).text


def test_export_into_a_folder_uses_the_stacks_file_name_and_stdout_without_out(reports, tmp_path):
    run("export", str(reports[0]), "--to", "axolotl", "--out", str(tmp_path))
    written = [p.name for p in tmp_path.iterdir()]
    assert len(written) == 1 and written[0].endswith((".yml", ".yaml"))
    shown = run("export", str(reports[0]), "--to", "llama-factory").stdout
    assert "lora_target" in yaml.safe_load(shown)


def test_export_merge_keeps_every_other_key(reports, tmp_path):
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump({"model_name_or_path": "my/model", "lora_rank": 64, "cutoff_len": 1024,
                                      "lora_target": "all"}, sort_keys=False))
    run("export", str(reports[0]), "--to", "llama-factory", "--merge", str(config))
    merged = yaml.safe_load(config.read_text())
    assert merged["model_name_or_path"] == "my/model" and merged["cutoff_len"] == 1024
    assert merged["lora_target"] != "all" and merged["lora_rank"] == Report.load(reports[0]).recommendation.rank
    assert list(merged)[:3] == ["model_name_or_path", "lora_rank", "cutoff_len"]  # order kept


def test_export_errors_are_one_line(reports, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    one_line_error(run("export", str(reports[0]), "--to", "axolotl", "--merge", str(bad), check=None))
    one_line_error(run("export", str(reports[0]), "--to", "unsloth", "--merge", str(bad), check=None))
    assert bad.read_text() == "a: [1, 2\n"


def test_diff_prints_a_table_and_json(reports, tmp_path):
    a, b = (Report.load(p) for p in reports)
    proc = run("diff", str(reports[0]), str(reports[1]), "--json", "--plot", str(tmp_path / "d.png"))
    diff = json.loads(proc.stdout)
    for row in diff["types"]:
        nfn_a = next(t.nfn_mean for t in a.types if t.type == row["type"])
        nfn_b = next(t.nfn_mean for t in b.types if t.type == row["type"])
        assert row["delta"] == pytest.approx(nfn_b - nfn_a)
    assert diff["recommendation_changed"] == (set(a.recommendation.types) != set(b.recommendation.types))
    assert (tmp_path / "d.png").read_bytes().startswith(b"\x89PNG")
    assert "NFN A" in proc.stderr
    same = run("diff", str(reports[0]), str(reports[0])).stdout
    assert "recommendation unchanged" in same


def test_diff_of_a_missing_report_is_one_line(reports, tmp_path):
    line = one_line_error(run("diff", str(reports[0]), str(tmp_path / "nope.json"), check=None))
    assert "nope.json" in line and "no such file" in line.lower()


class _Buttons(HTMLParser):
    def __init__(self):
        super().__init__()
        self.buttons = 0

    def handle_starttag(self, tag, attrs):
        self.buttons += tag == "button"


def test_show_html_has_a_copy_button_per_stack(reports, tmp_path):
    out = tmp_path / "r.html"
    run("show", str(reports[0]), "--html", str(out))
    parser = _Buttons()
    parser.feed(out.read_text())
    assert parser.buttons >= len(FORMATS)  # peft's LoraConfig line, target_modules and every other stack
    assert "http://" not in out.read_text() and "https://" not in out.read_text()
