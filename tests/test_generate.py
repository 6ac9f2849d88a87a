"""``--generate K``: the diagnosis scores the model's own seeded samples of each prompt, not the data's
responses, and records how they were made."""

from __future__ import annotations

import json

import pytest
import torch

from plop import diagnose
from plop.errors import ConfigError
from plop.files.data import Example
from plop.measure.generate import complete
from tiny_lm import examples, make_model, make_tokenizer

torch.set_num_threads(1)
SETTINGS = {"generate": 3, "max_new_tokens": 8, "tokens": "response", "n_bootstrap": 20}


def nfn(report) -> dict[str, float]:
    return {m.name: m.nfn for m in report.modules}


def test_the_scored_responses_are_the_models_own_seeded_samples():
    model, tokenizer, rows = make_model(), make_tokenizer(), examples(8)
    report = diagnose(model, rows, tokenizer, seed=5, **SETTINGS)
    # the same samples drawn by hand and diagnosed as plain data give exactly this report's NFN
    samples = complete(model, tokenizer, [e.prompt for e in rows], k=3, max_new_tokens=8, seed=5)
    by_hand = [Example(e.prompt, c) for e, group in zip(rows, samples) for c in group]
    assert nfn(diagnose(model, by_hand, tokenizer, seed=5, tokens="response", n_bootstrap=20)) == nfn(report)
    assert {c for group in samples for c in group}.isdisjoint({e.response for e in rows})  # not the data's answers
    assert report.data["samples"] == 24
    assert report.data["generated"] == {"completions_per_prompt": 3, "max_new_tokens": 8, "seed": 5,
                                        "sampling": "model", "temperature": 1.0, "top_p": 1.0, "top_k": 50}
    assert report.settings["generate"] == 3


def test_same_seed_same_report_other_seed_other_samples():
    model, tokenizer, rows = make_model(), make_tokenizer(), examples(8)
    first, again, other = (diagnose(model, rows, tokenizer, seed=s, **SETTINGS) for s in (0, 0, 1))
    strip = ("created", "seconds")
    same = [{k: v for k, v in json.loads(r.to_json())["data"].items() if k not in strip} for r in (first, again)]
    assert same[0] == same[1] and nfn(first) == nfn(again)
    assert first.to_dict()["types"] == again.to_dict()["types"]
    assert nfn(other) != nfn(first)
    # sampling leaves the caller's random stream where it was
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    diagnose(model, rows, tokenizer, **SETTINGS)
    assert torch.rand(1) == expected


def test_generate_needs_prompts_and_a_number_of_samples():
    with pytest.raises(ConfigError, match="generate needs prompts to complete"):
        diagnose(make_model(), [e.text for e in examples(4)], make_tokenizer(), generate=2)
    with pytest.raises(ConfigError, match="generate with until_stable"):
        diagnose(make_model(), examples(4), make_tokenizer(), generate=2, until_stable=True)
    with pytest.raises(ConfigError, match="generating completions needs a prompt in every row"):
        diagnose(make_model(), [Example("", "1")] * 4, make_tokenizer(), generate=2)


@pytest.mark.spawns
def test_cli_diagnose_generate_records_it(tmp_path):
    from test_cli_train import plop
    from tiny_lm import save_tiny, write_jsonl

    out = tmp_path / "r.json"
    result = plop("diagnose", save_tiny(tmp_path / "m"), "--data", write_jsonl(tmp_path / "d.jsonl", 12), "--samples",
                  "6", "--generate", "2", "--max-new-tokens", "5", "--tokens", "response", "--out", out)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["data"]["generated"]["completions_per_prompt"] == 2 and report["data"]["samples"] == 12
    assert report["settings"]["tokens"] == "response"
