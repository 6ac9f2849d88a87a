"""``exclude``: types or modules never recommended, by every strategy, and recorded in the report."""

from __future__ import annotations

import json

import pytest
from conftest import make_batches, make_llama

from plop import diagnose
from plop.cli import main
from plop.errors import ConfigError


@pytest.mark.parametrize("settings", [{"strategy": "top_k", "top_k": 3}, {"strategy": "budget", "budget": 30_000},
                                      {"strategy": "allocate"}, {"strategy": "per_layer", "top_k": 2}])
def test_every_strategy_honours_the_exclusions(tiny_llama, settings):
    batches = make_batches(8, 16)
    free = diagnose(tiny_llama, batches, n_bootstrap=20, **settings)
    lowest_type = free.types[0].type  # the type the free run ranks first
    named = free.recommendation.modules[0]  # and a module it picked
    report = diagnose(tiny_llama, batches, n_bootstrap=20, exclude=[lowest_type, named], **settings)
    rec = report.recommendation
    assert lowest_type not in rec.types and named not in rec.modules
    assert not any(m.endswith("." + lowest_type) for m in rec.modules)
    assert rec.modules and rec.excluded == {lowest_type: "excluded by the user", named: "excluded by the user"}
    assert report.settings["exclude"] == [lowest_type, named]
    assert [t.type for t in report.types] == [t.type for t in free.types]  # still measured and ranked


def test_exclude_on_the_command_line_is_recorded(tmp_path, capsys):
    from tiny_lm import save_tiny, write_jsonl

    model, data, out = save_tiny(tmp_path / "m"), write_jsonl(tmp_path / "d.jsonl", 16), tmp_path / "r.json"
    assert main(["diagnose", str(model), "--data", str(data), "--exclude", "q_proj, k_proj", "--top-k", "5",
                 "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["settings"]["exclude"] == ["q_proj", "k_proj"]
    assert not {"q_proj", "k_proj"} & set(saved["recommendation"]["types"])
    assert len(saved["recommendation"]["types"]) == 5


def test_exclude_must_name_something():
    with pytest.raises(ConfigError, match="exclude must be a list"):
        diagnose(make_llama(), make_batches(4, 8), exclude=[""])
