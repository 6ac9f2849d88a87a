"""The grad-sign signal: sign consistency of rank-1 LoRA-B gradients (plop.measure.grad_sign), against
PEFT's own rank-1 adapters and torch.autograd, on the base model it must leave bit-identical."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from plop import diagnose
from plop.config import DiagnoseConfig, Strategy
from plop.errors import ConfigError
from plop.measure.batching import Batch
from plop.measure.grad_sign import b_gradients, grad_sign_scores, probe_vectors
from plop.model.layers import find_linear_modules
from plop.ranking.ranker import Selector, signal_values
from plop.ranking.report import Report
from conftest import make_batches, make_llama

K = 3


def _scored_batches(k: int = K) -> list[Batch]:
    """Token batches whose second half is scored (a response), some rows padded short."""
    out = []
    for j, b in enumerate(make_batches(n_seqs=4 * k, seq_len=24, batch_size=4, seed=11,
                                       lengths=[24, 20, 17, 24] * k)):
        scored = b["attention_mask"].clone()
        scored[:, :10] = 0
        out.append(Batch(b, np.arange(4 * j, 4 * j + 4), scored=scored))
    return out


def _peft_gradients(model, names: list[str], batches: list[Batch], seed: int) -> dict[str, torch.Tensor]:
    """dL/dB by PEFT's own rank-1 LoRA on a copy (A set to plop's probe rows, B = 0, scaling 1) and
    HF's own masked causal-LM loss: an independent route to what b_gradients computes."""
    from peft import LoraConfig, get_peft_model

    copied = copy.deepcopy(model)
    rows = probe_vectors({n: dict(copied.named_modules())[n] for n in names}, seed)
    peft_model = get_peft_model(copied, LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, target_modules=names))
    lora_b = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            short = name.removeprefix("base_model.model.")
            with torch.no_grad():
                module.lora_A["default"].weight.copy_(rows[short])
            lora_b[short] = module.lora_B["default"].weight
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for batch in batches:
        labels = batch.inputs["input_ids"].masked_fill(batch.scored == 0, -100)
        loss = peft_model(**batch.inputs, labels=labels).loss
        for n, g in zip(names, torch.autograd.grad(loss, [lora_b[n] for n in names])):
            grads[n].append(g.reshape(-1))
    return {n: torch.stack(g) for n, g in grads.items()}


def _consistency(grads: torch.Tensor) -> float:
    """The definition written out entry by entry: the same nonzero sign in every batch."""
    signs = torch.sign(grads).tolist()
    agree = [len({s[i] for s in signs}) == 1 and signs[0][i] != 0 for i in range(grads.shape[1])]
    return sum(agree) / len(agree)


def test_scores_equal_peft_rank_one_autograd():
    model, batches = make_llama(), _scored_batches()
    modules = find_linear_modules(model)
    ours = b_gradients(model, modules, batches, K, seed=5, device=torch.device("cpu"))
    theirs = _peft_gradients(model, list(modules), batches, seed=5)
    scores = grad_sign_scores(model, modules, batches, K, seed=5, device=torch.device("cpu"))
    assert set(ours) == set(modules) == set(scores)
    for name in modules:
        assert ours[name].shape == (K, modules[name].out_features)
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-7)
        assert scores[name] == pytest.approx(_consistency(theirs[name]), abs=1e-9), name
    assert len(set(scores.values())) > 1  # the scores separate the modules at all


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: p.requires_grad for n, p in
                                                                  model.named_parameters()}


def _assert_untouched(model, before) -> None:
    state, flags = before
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert "lora" not in type(module).__name__.lower()
    assert not hasattr(model, "peft_config")


def test_base_model_bit_identical_afterwards():
    model = make_llama()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # a frozen weight stays frozen
    before = _snapshot(model)
    grad_sign_scores(model, find_linear_modules(model), _scored_batches(), K, seed=0, device=torch.device("cpu"))
    _assert_untouched(model, before)


def test_base_model_bit_identical_when_the_forward_raises():
    model = make_llama()
    before = _snapshot(model)

    def fail(module, args):
        raise RuntimeError("boom in the second layer")

    handle = model.model.layers[1].mlp.register_forward_pre_hook(fail)  # after layer 0's probes ran
    with pytest.raises(RuntimeError, match="boom"):
        grad_sign_scores(model, find_linear_modules(model), _scored_batches(), K, seed=0,
                         device=torch.device("cpu"))
    handle.remove()
    _assert_untouched(model, before)


@pytest.mark.parametrize("settings, says", [
    ({"signal": "grad-sign", "grad_batches": 1}, "grad_batches must be a whole number >= 2"),
    ({"signal": "grad-sign", "generate": 4}, "grad-sign under GRPO (generate) is not built yet"),
    ({"signal": "nfn+grad-sign", "signal_weight": 1.5}, "signal_weight must be a number in [0, 1]"),
    ({"signal": "gradient"}, "signal must be one of nfn, grad-sign, nfn+grad-sign"),
    ({"signal": "grad-sign", "until_stable": True}, "until_stable"),
])
def test_bad_input_is_one_line(settings, says):
    with pytest.raises(ConfigError) as error:
        DiagnoseConfig(**settings)
    assert says in str(error.value) and "\n" not in str(error.value)


def test_too_few_batches_is_one_line():
    model = make_llama()
    with pytest.raises(ValueError, match="grad-sign needs 3 batches, the data made 2") as error:
        diagnose(model, make_batches(n_seqs=16, batch_size=8), signal="grad-sign", grad_batches=3, n_bootstrap=5)
    assert "\n" not in str(error.value)


def test_diagnose_recommends_the_most_consistent_types():
    data = make_batches(n_seqs=24, batch_size=4)
    report = diagnose(make_llama(), data, signal="grad-sign", grad_batches=K, top_k=2, n_bootstrap=5)
    scores = {m.name: m.grad_sign for m in report.modules}
    assert all(s is not None and 0 <= s <= 1 for s in scores.values())
    fresh = make_llama()  # the same weights: the diagnosis's scores are the first K batches'
    expected = grad_sign_scores(fresh, find_linear_modules(fresh), (Batch(b, np.arange(4)) for b in data), K, seed=0,
                                device=torch.device("cpu"))
    assert scores == pytest.approx(expected)
    by_type: dict[str, list[float]] = {}
    for m in report.modules:
        by_type.setdefault(m.type, []).append(m.grad_sign)
    highest = sorted(by_type, key=lambda t: (-np.mean(by_type[t]), t))
    assert sorted(report.recommendation.types) == sorted(highest[:2])  # higher consistency = adapted
    assert [t.type for t in report.types] == highest
    assert report.settings["signal"] == "grad-sign" and report.settings["grad_batches"] == K
    assert all(m.nfn > 0 for m in report.modules)  # NFN still measured beside it
    back = Report.from_dict(report.to_dict())  # the schema takes the new field
    assert [m.grad_sign for m in back.modules] == [m.grad_sign for m in report.modules]


@pytest.mark.parametrize("strategy", [Strategy("top_k", top_k=2), Strategy("budget", budget=20_000),
                                      Strategy("allocate", top_k=2), Strategy("per_layer", top_k=1)])
def test_combination_reduces_to_either_signal_at_the_extremes(strategy):
    report = diagnose(make_llama(), make_batches(n_seqs=24, batch_size=4), signal="grad-sign", grad_batches=K,
                      n_bootstrap=5)
    records = report.modules

    def pick(values):
        rec = Selector(records, strategy, rank=8, values=values).recommend()[0]
        return rec.types, rec.modules, rec.rank_pattern

    nfn, sign = signal_values(records, "nfn"), signal_values(records, "grad-sign")
    assert pick(signal_values(records, "nfn+grad-sign", 0.0)) == pick(nfn)
    assert pick(signal_values(records, "nfn+grad-sign", 1.0)) == pick(sign)
    halfway = signal_values(records, "nfn+grad-sign", 0.5)
    assert np.isfinite(halfway).all() and (halfway > 0).all()  # allocate's ratios need positive values
    assert pick(halfway)[0]


def test_combined_signal_end_to_end_matches_nfn_at_weight_zero():
    data = make_batches(n_seqs=24, batch_size=4)
    plain = diagnose(make_llama(), data, top_k=2, n_bootstrap=5)
    combined = diagnose(make_llama(), data, top_k=2, n_bootstrap=5, signal="nfn+grad-sign", signal_weight=0.0,
                        grad_batches=K)
    assert combined.recommendation.types == plain.recommendation.types
    assert [t.type for t in combined.types] == [t.type for t in plain.types]
    assert combined.recommendation.agreement is None  # no bootstrap of the gradient signal
