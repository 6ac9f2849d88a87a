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
from plop.measure.grad_sign import b_gradients, grad_sign_scores, group_advantages, probe_vectors
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


def _hf_loss(peft_model, batch: Batch) -> torch.Tensor:
    """HF's own masked causal-LM loss."""
    return peft_model(**batch.inputs, labels=batch.inputs["input_ids"].masked_fill(batch.scored == 0, -100)).loss


def _grpo_objective(advantages: np.ndarray):
    """GRPO's clipped surrogate at its first step, written out as TRL writes it (the ratio
    ``exp(logp - old_logp)`` with ``old_logp`` the detached current one, clipped at 0.2; the loss
    summed over completion tokens, over their count): an independent route to ``grpo_loss``."""
    def loss(peft_model, batch: Batch) -> torch.Tensor:
        logits = peft_model(**batch.inputs).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, batch.inputs["input_ids"][:, 1:, None]).squeeze(-1)
        ratio = torch.exp(logp - logp.detach())
        adv = torch.as_tensor(advantages[batch.rows], dtype=torch.float32)[:, None]
        per_token = -torch.min(ratio * adv, torch.clamp(ratio, 0.8, 1.2) * adv)
        mask = batch.scored[:, 1:].float()
        return (per_token * mask).sum() / mask.sum()
    return loss


def _peft_gradients(model, names: list[str], batches: list[Batch], seed: int, loss_of=_hf_loss
                    ) -> dict[str, torch.Tensor]:
    """dL/dB by PEFT's own rank-1 LoRA on a copy (A set to plop's probe rows, B = 0, scaling 1) and
    ``loss_of`` (HF's own masked causal-LM loss): an independent route to what b_gradients computes."""
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
        loss = loss_of(peft_model, batch)
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
    ({"signal": "grad-sign", "generate": 4}, "needs a reward"),
    ({"signal": "grad-sign", "generate": 1, "reward": "r:f"}, "generate at least 2"),
    ({"signal": "nfn", "generate": 4, "reward": "r:f"}, "reward is read only by a grad-sign signal with generate"),
    ({"signal": "grad-sign", "reward": "r:f"}, "reward is read only by a grad-sign signal with generate"),
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


# -- GRPO: the loss on the model's own sampled groups, weighted by the reward's advantages ------------
def test_grpo_scores_equal_the_clipped_surrogate_through_peft():
    """Under GRPO the B-gradients equal those of GRPO's clipped surrogate (ratio, clip, token mean)
    through PEFT's own rank-1 LoRA, and the consistency scores follow; rows of advantage 0 add nothing."""
    model, batches = make_llama(), _scored_batches()
    advantages = np.random.default_rng(3).normal(size=4 * K)
    advantages[1::4] = 0.0
    modules = find_linear_modules(model)
    ours = b_gradients(model, modules, batches, K, seed=5, device=torch.device("cpu"), advantages=advantages)
    theirs = _peft_gradients(model, list(modules), batches, seed=5, loss_of=_grpo_objective(advantages))
    scores = grad_sign_scores(model, modules, batches, K, seed=5, device=torch.device("cpu"), advantages=advantages)
    for name in modules:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-7)
        assert scores[name] == pytest.approx(_consistency(theirs[name]), abs=1e-9), name
    sft = b_gradients(model, modules, batches, K, seed=5, device=torch.device("cpu"))
    assert not all(torch.allclose(sft[n], ours[n]) for n in modules)  # the advantages, not the SFT loss


def test_group_advantages_are_trls_group_normalisation():
    rewards = np.array([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0, 0.0, 3.0, 1.0, 1.0])
    ours = group_advantages(rewards, 4)
    r = torch.tensor(rewards).view(-1, 4)  # as TRL's GRPOTrainer: torch.std (unbiased), + 1e-4
    expected = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-12)
    assert np.all(ours[4:8] == 0)  # a group of equal rewards teaches nothing
    np.testing.assert_allclose(ours.reshape(-1, 4).sum(1), 0, atol=1e-12)


REWARD = """
def digits(completions, response, **kwargs):
    return [sum(ch.isdigit() for ch in c) + (0.5 if c.strip()[:1] == r.strip()[:1] else 0.0)
            for c, r in zip(completions, response)]


def constant(completions, **kwargs):
    return [1.0] * len(completions)
"""


def _grpo_diagnosis(tmp_path, reward: str, **settings):
    from tiny_lm import examples, make_model, make_tokenizer

    (tmp_path / "rewards.py").write_text(REWARD)
    model = make_model()
    before = _snapshot(model)
    report = diagnose(model, examples(8), make_tokenizer(), signal="grad-sign", generate=4, max_new_tokens=6,
                      reward=f"{tmp_path / 'rewards.py'}:{reward}", grad_batches=2, batch_size=4,
                      tokens="response", n_bootstrap=5, **settings)
    _assert_untouched(model, before)
    return report


def test_grpo_diagnosis_end_to_end_records_the_reward_and_leaves_the_model(tmp_path):
    report = _grpo_diagnosis(tmp_path, "digits")
    scored = [m for m in report.modules if m.grad_sign is not None]
    assert scored and all(0 <= m.grad_sign <= 1 for m in scored)
    assert report.settings["signal"] == "grad-sign" and report.settings["reward"].endswith("rewards.py:digits")
    assert report.data["generated"]["completions_per_prompt"] == 4
    assert report.recommendation.types
    again = Report.from_dict(report.to_dict())
    assert [m.grad_sign for m in again.modules] == [m.grad_sign for m in report.modules]
    from rich.console import Console

    from plop.ranking.render import render_report

    console = Console(record=True, width=160)
    console.print(render_report(report))
    text = console.export_text()
    assert "ranked by grad-sign" in text and "grad-sign" in text.splitlines()[next(
        i for i, line in enumerate(text.splitlines()) if "NFN ± std" in line)]
    first = report.types[0].type  # the first choice shows the highest mean consistency of its scored modules
    shown = {m.type: [] for m in scored}
    for m in scored:
        shown[m.type].append(m.grad_sign)
    assert max(shown, key=lambda t: sum(shown[t]) / len(shown[t])) == first


def test_grpo_diagnosis_with_a_constant_reward_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="grad-sign needs 2 batches, the data made 0; 2 more had every completion "
                                         "rewarded as the others of its prompt") as error:
        _grpo_diagnosis(tmp_path, "constant")
    assert "\n" not in str(error.value)
