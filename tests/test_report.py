"""The Report: JSON round trip, atomic save, schema errors, DataFrames, PEFT config, rendering."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
import os
import re
import stat

import pytest
import torch

from conftest import make_batches, make_llama
from plop import DiagnoseConfig, FileError, Report, ReportError, Strategy, diagnose
from plop.ranking.report import SCHEMA_VERSION

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def report(tiny_llama) -> Report:
    return diagnose(tiny_llama, make_batches(16, 16), top_k=3, rank=8, n_bootstrap=50, model_id="tiny-llama",
                    data_info={"source": "unit-test"})


@pytest.fixture
def saved(report, tmp_path):
    path = tmp_path / "report.json"
    report.save(path)
    return path


# -- JSON -------------------------------------------------------------------------------------
def test_json_round_trip_loses_nothing(report, saved, tmp_path):
    loaded = Report.load(saved)
    assert loaded.to_dict() == report.to_dict()
    assert loaded == report
    assert loaded.data["source"] == "unit-test" and loaded.model["id"] == "tiny-llama"
    assert loaded.modules[0].nfn == report.modules[0].nfn  # floats survive exactly
    # saving what was loaded writes the very same file
    again = loaded.save(tmp_path / "again.json")
    assert again.read_text() == saved.read_text()
    assert json.loads(saved.read_text())["schema_version"] == SCHEMA_VERSION


def test_from_dict_accepts_fields_a_later_plop_may_add(report):
    raw = report.to_dict()
    raw["new_top_level"] = 1
    raw["modules"][0]["new_module_field"] = "x"
    raw["types"][0]["new_type_field"] = 2.0
    raw["recommendation"]["new_recommendation_field"] = []
    assert Report.from_dict(raw) == report


def test_save_creates_parent_directories(report, tmp_path):
    path = report.save(tmp_path / "a" / "b" / "report.json")
    assert Report.load(path) == report


def test_saved_report_has_the_usual_permissions(report, tmp_path):
    umask = os.umask(0o022)
    try:
        path = report.save(tmp_path / "r.json")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's private 0600


def test_save_is_atomic(report, saved):
    good = saved.read_text()
    report.settings["callback"] = object()  # not JSON-serializable
    with pytest.raises(TypeError, match="not JSON serializable"):
        report.save(saved)
    assert saved.read_text() == good
    assert sorted(p.name for p in saved.parent.iterdir()) == ["report.json"]  # no temp files left
    assert Report.load(saved).settings == json.loads(good)["settings"]


def test_failed_replace_leaves_no_temp_file(report, tmp_path):
    """A directory where the report should go is refused before anything is written."""
    target = tmp_path / "report.json"
    target.mkdir()
    with pytest.raises(FileError, match="is a directory"):
        report.save(target)
    assert target.is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def _write(path, raw) -> str:
    path.write_text(json.dumps(raw))
    return str(path)


def _load_error(path) -> str:
    with pytest.raises(ReportError) as info:
        Report.load(path)
    message = str(info.value)
    assert str(path) in message
    return message


def test_missing_field(report, tmp_path):
    raw = report.to_dict()
    del raw["recommendation"]
    message = _load_error(_write(tmp_path / "r.json", raw))
    assert "'recommendation' is a required property" in message


def test_missing_nested_field(report, tmp_path):
    raw = report.to_dict()
    del raw["modules"][1]["d_in"]
    message = _load_error(_write(tmp_path / "r.json", raw))
    assert "modules/1" in message and "d_in" in message


def test_wrong_type(report, tmp_path):
    raw = report.to_dict()
    raw["modules"][0]["nfn"] = "very low"
    message = _load_error(_write(tmp_path / "r.json", raw))
    assert "modules/0/nfn" in message and "'very low' is not of type 'number'" in message


def test_wrong_strategy_and_empty_modules(report, tmp_path):
    raw = report.to_dict()
    raw["recommendation"]["strategy"] = "everything"
    assert "recommendation/strategy" in _load_error(_write(tmp_path / "a.json", raw))
    raw = report.to_dict()
    raw["modules"] = []
    assert "modules" in _load_error(_write(tmp_path / "b.json", raw))


def test_newer_schema_version(report, tmp_path):
    raw = report.to_dict()
    raw["schema_version"] = SCHEMA_VERSION + 1
    message = _load_error(_write(tmp_path / "r.json", raw))
    assert f"schema version {SCHEMA_VERSION + 1}" in message and "upgrade plop" in message


def test_not_a_plop_report(report, tmp_path):
    raw = report.to_dict()
    raw["schema"] = "someone.else"
    assert "schema" in _load_error(_write(tmp_path / "a.json", raw))
    assert "a report is a JSON object, got list" in _load_error(_write(tmp_path / "b.json", [1, 2]))


def test_non_json_file(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("target_modules = q_proj\n")
    assert "not JSON (line 1, column 1" in _load_error(text)
    binary = tmp_path / "plot.png"
    binary.write_bytes(PNG_MAGIC + bytes(range(256)))
    assert "not UTF-8 text" in _load_error(binary)


def test_missing_file(tmp_path):
    assert "no such file" in _load_error(tmp_path / "nope.json")


def test_directory_instead_of_file(tmp_path):
    assert "is not a regular file (a directory)" in _load_error(tmp_path)


# -- DataFrames -------------------------------------------------------------------------------
def test_to_dataframe_module_level(report):
    df = report.to_dataframe("module")
    assert len(df) == len(report.modules) == 14
    assert {"name", "type", "layer", "nfn", "d_in", "d_out", "recommended"} <= set(df.columns)
    assert set(df.loc[df["recommended"], "name"]) == set(report.recommendation.modules)
    assert df["nfn"].tolist() == [m.nfn for m in report.modules]
    assert df.loc[df["recommended"], "type"].isin(report.recommendation.types).all()


def test_to_dataframe_type_level(report):
    df = report.to_dataframe("type")
    assert df["type"].tolist() == report.module_types
    assert df["position"].tolist() == list(range(1, len(df) + 1))
    assert df["nfn_mean"].is_monotonic_increasing
    assert df.loc[df["recommended"], "type"].tolist() == report.recommendation.types  # the 3 lowest
    assert df["recommended"].sum() == 3
    assert df["selection_probability"].between(0, 1).all()
    with pytest.raises(ValueError, match="level"):
        report.to_dataframe("layer")


# -- PEFT -------------------------------------------------------------------------------------
def _lora_wrapped(peft_model) -> set[str]:
    return {name.removeprefix("base_model.model.") for name, m in peft_model.named_modules() if hasattr(m, "lora_A")}


@pytest.mark.parametrize("strategy", ["top_k", "per_layer", "budget"])
def test_peft_config_wraps_exactly_the_recommended_modules(strategy, tmp_path):
    from peft import get_peft_model

    model = make_llama()
    data = make_batches(16, 16)
    budget = 5_000 if strategy == "budget" else None
    report = diagnose(model, data, strategy=strategy, top_k=2, budget=budget, rank=4, n_bootstrap=20)
    # through a saved file, as a user on another machine would get it
    loaded = Report.load(report.save(tmp_path / "r.json"))
    config = loaded.to_peft_config(lora_dropout=0.1)
    assert config.r == 4 and config.lora_alpha == 8 and config.lora_dropout == 0.1
    assert config.task_type == "CAUSAL_LM"
    ids = data[0]["input_ids"][:2]
    before = model(input_ids=ids).logits
    peft_model = get_peft_model(model, config)
    wrapped = _lora_wrapped(peft_model)
    assert wrapped == set(report.recommendation.modules)
    assert len(wrapped) == (4 if strategy == "per_layer" else len(report.recommendation.types) * 2)
    if strategy == "budget":
        assert report.recommendation.trainable_params <= budget
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == report.recommendation.trainable_params
    with torch.no_grad():  # LoRA's B starts at zero: the wrapped model computes the same function
        assert torch.allclose(peft_model(input_ids=ids).logits, before, atol=1e-5)


def test_peft_config_on_gpt2_conv1d(tiny_gpt2):
    """GPT-2's c_proj names both the attention and the MLP output projection: the report's
    modules list and PEFT's suffix match agree on that."""
    from peft import get_peft_model

    report = diagnose(tiny_gpt2, make_batches(8, 16), top_k=2, rank=4, n_bootstrap=10)
    config = report.to_peft_config()
    assert config.task_type == "CAUSAL_LM"
    peft_model = get_peft_model(tiny_gpt2, config)
    assert _lora_wrapped(peft_model) == set(report.recommendation.modules)
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == report.recommendation.trainable_params


def test_peft_config_rank_override(report):
    config = report.to_peft_config(r=32, lora_alpha=16)
    assert (config.r, config.lora_alpha) == (32, 16)
    assert set(config.target_modules) == set(report.recommendation.target_modules)


def test_task_type_from_architecture(tiny_gpt2, tiny_bert):
    assert diagnose(tiny_gpt2, make_batches(4, 8), n_bootstrap=10).task_type == "CAUSAL_LM"
    bert = diagnose(tiny_bert, make_batches(4, 8), n_bootstrap=10)
    assert bert.task_type is None
    assert bert.to_peft_config().task_type is None


# -- rendering --------------------------------------------------------------------------------
def test_rich_rendering(report):
    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(report)
    text = console.export_text()
    assert f"target_modules={report.recommendation.target_modules!r}" in text
    for t in report.types:
        assert re.search(rf"\b{re.escape(t.type)}\b", text), t.type
    assert "tiny-llama" in text


def test_rich_rendering_of_a_loaded_per_layer_report(tmp_path):
    from rich.console import Console

    report = diagnose(make_llama(), make_batches(8, 8), strategy="per_layer", top_k=1, n_bootstrap=10)
    loaded = Report.load(report.save(tmp_path / "r.json"))
    console = Console(record=True, width=200)
    console.print(loaded)
    text = console.export_text()
    for t in loaded.types:
        assert t.type in text
    assert "per_layer" in text


def test_plot_writes_png(report, tmp_path):
    import matplotlib.pyplot as plt

    path = tmp_path / "nfn.png"
    fig = report.plot(path)
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert path.stat().st_size > 5_000
    assert fig is not None
    plt.close("all")


def test_reports_in_older_settings_load_in_todays(report, tmp_path):
    """Before until_stable, samples="auto" asked for the stop at a stable recommendation, with no limit
    on the rows given; before Strategy, its parts stood beside the other settings. A report saying so
    reads in today's settings, and its config builds."""
    raw = report.to_dict()
    old = {k: v for k, v in raw["settings"].items() if k not in ("until_stable", "strategy")}
    raw["settings"] = {**old, "samples": "auto", "strategy": "allocate", "top_k": 2, "budget": None,
                       "allocate_power": 1.5}
    loaded = Report.load(_write(tmp_path / "old.json", raw))
    strategy = Strategy("allocate", top_k=2, power=1.5)
    assert loaded.settings == {**report.settings, "samples": None, "until_stable": True, "strategy": asdict(strategy)}
    assert loaded.modules == report.modules and loaded.recommendation == report.recommendation
    config = DiagnoseConfig.from_settings(loaded.settings)
    assert config == DiagnoseConfig.from_settings(raw["settings"])
    assert (config.samples, config.until_stable, config.strategy, config.rank) == (None, True, strategy, 8)


def test_version_1_reports_still_load():
    """The study's committed reports were written as version 1: their counts were 'tokens' and a
    type's place was 'rank'; they load into today's names with every value kept."""
    path = Path(__file__).parent.parent / "benchmarks" / "results" / "placement_study_gsm8k_report.json"
    raw = json.loads(path.read_text())
    assert raw["schema_version"] == 1
    report = Report.load(path)
    assert report.schema_version == SCHEMA_VERSION == 3
    assert report.data["token_count"] == raw["data"]["tokens"]
    assert [m.token_count for m in report.modules] == [m["tokens"] for m in raw["modules"]]
    assert [t.position for t in report.types] == [t["rank"] for t in raw["types"]]
    assert json.loads(report.to_json())["types"][0]["position"] == 1


def test_version_2_allocations_load_with_their_alphas_derived(tmp_path):
    """Version 2 stored an allocation's alpha_pattern (2 x each rank, the default alpha); version 3
    derives it from the LoRA settings, so an overridden alpha is no longer pinned to the default."""

    report = diagnose(make_llama(), make_batches(8, 8), strategy="allocate", budget=12_000, n_bootstrap=10)
    raw = json.loads(report.to_json())
    ranks = raw["recommendation"]["rank_pattern"]
    raw["schema_version"] = 2
    raw["recommendation"]["alpha_pattern"] = {t: 2 * r for t, r in ranks.items()}
    del raw["recommendation"]["name"]
    (tmp_path / "v2.json").write_text(json.dumps(raw))
    old = Report.load(tmp_path / "v2.json")
    assert old.schema_version == 3 and old.recommendation.name == "recommended"
    assert old.recommendation.alpha_pattern is None and old.recommendation.rank_pattern == ranks
    assert old.to_peft_config().alpha_pattern == raw["recommendation"]["alpha_pattern"]
    assert old.to_peft_config(lora_alpha=old.recommendation.rank).alpha_pattern == ranks
