"""Which tokens a diagnosis scores: prompt/response examples read whole by a decoder-only model,
with the statistics taken on the prompt's tokens, the response's, or all of them."""

from __future__ import annotations

import json

import pytest
import torch

from plop import diagnose
from plop.cli import main
from plop.files.data import Example
from plop.errors import ConfigError
from tiny_lm import examples, make_model, make_tokenizer, save_tiny


def _examples() -> list[Example]:
    return [Example(f"Q: {a} plus {b} times {a}?\nA: ", f"{a + b * a}, since {b}*{a} is {b * a}.")
            for a in range(5) for b in range(4)]


def test_response_scope_is_the_nfn_of_the_response_tokens(reference):
    """Against an independent float64 computation over each example's response positions."""
    model, tokenizer, data = make_model(), make_tokenizer(), _examples()
    report = diagnose(model, data, tokenizer, tokens="response", n_bootstrap=20, max_length=64)
    rows = []
    for e in data:
        prompt = tokenizer(e.prompt)["input_ids"]
        ids = prompt + tokenizer(e.response, add_special_tokens=False)["input_ids"]
        scored = torch.tensor([[0] * len(prompt) + [1] * (len(ids) - len(prompt))])
        rows.append({"input_ids": torch.tensor([ids]), "attention_mask": scored})  # the reference's mask
    names = [m.name for m in report.modules]
    expected = reference(model, lambda b: model.model(input_ids=b["input_ids"], use_cache=False), rows, names)
    for m in report.modules:
        assert m.nfn == pytest.approx(expected[m.name]["nfn"], rel=1e-5), m.name
        assert m.token_count == expected[m.name]["tokens"]
    assert report.settings["tokens"] == "response"


def test_prompt_and_response_scopes_split_the_whole():
    """With a tokenizer whose joined and separate tokenizations agree, the two scopes' tokens add
    up to all of them, and their ratio sums to the whole's."""
    model, tokenizer, data = make_model(), make_tokenizer(), _examples()
    parts = {scope: diagnose(model, data, tokenizer, tokens=scope, n_bootstrap=10, max_length=64)
             for scope in ("prompt", "response", "all")}
    for name in (m.name for m in parts["all"].modules):
        p, r, a = (next(m for m in parts[s].modules if m.name == name) for s in ("prompt", "response", "all"))
        assert p.token_count + r.token_count == a.token_count
        assert p.nfn * p.token_count + r.nfn * r.token_count == pytest.approx(a.nfn * a.token_count, rel=1e-6)
    assert parts["prompt"].data["token_count"] + parts["response"].data["token_count"] == parts["all"].data["token_count"]


@pytest.mark.parametrize("tokens", ["prompt", "response"])
def test_a_scope_needs_prompt_response_examples(tokens):
    model, tokenizer = make_model(), make_tokenizer()
    with pytest.raises(ConfigError, match="prompt/response"):
        diagnose(model, ["plain text", "more text"], tokenizer, tokens=tokens)
    with pytest.raises(ConfigError, match="tokens"):
        diagnose(model, _examples(), tokenizer, tokens="answers")


def test_the_cli_scores_the_response(tmp_path):
    model = save_tiny(tmp_path / "model")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n" for e in examples(24)))
    reports = {}
    for scope in ("all", "response"):
        out = tmp_path / f"{scope}.json"
        assert main(["diagnose", str(model), "--data", str(data), "--tokens", scope, "--out", str(out)]) == 0
        reports[scope] = json.loads(out.read_text())
    assert reports["response"]["settings"]["tokens"] == "response"
    assert 0 < reports["response"]["data"]["token_count"] < reports["all"]["data"]["token_count"]


def test_the_rendered_report_says_which_tokens_were_scored():
    from rich.console import Console

    from plop.ranking.html_report import render_html

    model, tokenizer = make_model(), make_tokenizer()
    for scope, said in (("all", "all scored"), ("response", "response tokens scored")):
        report = diagnose(model, _examples(), tokenizer, tokens=scope, n_bootstrap=10, max_length=64)
        console = Console(width=120, record=True)
        console.print(report)
        assert f"{report.data['token_count']:,} tokens ({said})" in console.export_text()
        assert f"tokens ({said})" in render_html(report)
