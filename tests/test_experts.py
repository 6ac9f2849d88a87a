"""plop.measure.experts on real tiny MoE models: per-expert NFN against a brute-force reference that
routes every token by hand, padding, hook removal, and PEFT's ``target_parameters`` path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import archs
from conftest import make_batches
from plop.measure.experts import ExpertStats
from plop.model.experts import dense_routed, expert_weights, find_experts

MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3", "jamba", "llama4_text"]
LENGTHS = [12, 7, 12, 3]  # right padding in both batches


def _batches():
    return make_batches(len(LENGTHS), 12, 2, vocab=archs.SAFE_VOCAB, lengths=LENGTHS)


def _route(router, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """The experts one token goes to, from the router's weights alone. Softmax and sigmoid keep
    the order of the logits, so top-k of the logits (plus gpt-oss's bias) is the choice; DeepSeek-V3
    first keeps the ``topk_group`` groups whose two best corrected scores add up highest."""
    logits = x @ router.weight.double().T
    if getattr(router, "bias", None) is not None:
        logits = logits + router.bias.double()
    if hasattr(router, "e_score_correction_bias"):
        scores = logits.sigmoid() + router.e_score_correction_bias.double()
        groups = scores.view(router.num_group, -1)
        best = groups.topk(2).values.sum(-1).topk(router.topk_group).indices
        allowed = torch.full_like(groups, -math.inf)
        allowed[best] = groups[best]
        logits = allowed.flatten()
    return logits.topk(top_k).indices


def _gate(experts, h: torch.Tensor) -> torch.Tensor:
    """The expert's intermediate activation from its gate/up output, written out per family."""
    if type(experts).__name__ == "GptOssExperts":  # interleaved, clamped, (up + 1) * swish_alpha(gate)
        gate, up = h[..., ::2].clamp(max=experts.limit), h[..., 1::2].clamp(-experts.limit, experts.limit)
        return (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def brute_force(model, name: str, batches) -> dict[str, torch.Tensor]:
    """Per-expert NFN of every stacked weight, token by token in float64 from the MoE blocks'
    (batch, seq, hidden) inputs and the mask, with a hand-made routing."""
    experts = find_experts(model)
    blocks = {prefix: model.get_submodule(prefix.rsplit(".", 1)[0]) for prefix in experts}
    captured: dict[str, torch.Tensor] = {}
    handles = [block.register_forward_pre_hook(lambda mod, args, p=p: captured.__setitem__(p, args[0]))
               for p, block in blocks.items()]
    sums = {}
    try:
        for batch in batches:
            with torch.no_grad():
                model(**archs.inputs(name, batch))
            for prefix, module in experts.items():
                router = getattr(blocks[prefix], "router", None) or blocks[prefix].gate
                w = {k: v.detach().double() for k, v in expert_weights(module).items()}
                has_bias = getattr(module, "has_bias", False)
                b = module.gate_up_proj_bias.detach().double() if has_bias else 0.0
                acc = sums.setdefault(prefix, torch.zeros(2, 2, w["down_proj"].shape[0], dtype=torch.float64))
                hidden = captured[prefix].double()
                for i, j in batch["attention_mask"].nonzero().tolist():
                    z = hidden[i, j]
                    for e in _route(router, z, router.top_k).tolist():
                        # Llama-4 feeds each expert the token scaled by its sigmoid router score
                        x = z * torch.sigmoid(router.weight[e].double() @ z) if dense_routed(module) else z
                        h = w["gate_up_proj"][e] @ x
                        u = _gate(module, h + (b[e] if has_bias else 0.0))
                        acc[0, :, e] += torch.stack([h.norm() / x.norm(), torch.tensor(1.0, dtype=torch.float64)])
                        acc[1, :, e] += torch.stack([(w["down_proj"][e] @ u).norm() / u.norm(),
                                                     torch.tensor(1.0, dtype=torch.float64)])
    finally:
        for h in handles:
            h.remove()
    out = {}
    for prefix, module in experts.items():
        for k, (pname, weight) in enumerate(expert_weights(module).items()):
            weight = weight.detach().double()
            baseline = torch.linalg.matrix_norm(weight) / math.sqrt(weight.shape[2])
            out[f"{prefix}.{pname}"] = (sums[prefix][k, 0] / sums[prefix][k, 1] / baseline, sums[prefix][k, 1])
    return out


def collect(model, name: str, batches) -> ExpertStats:
    with ExpertStats(find_experts(model)) as stats:
        for batch in batches:
            stats.start_batch(batch["attention_mask"])
            with torch.no_grad():
                model(**archs.inputs(name, batch))
    return stats


@pytest.mark.parametrize("name", MOE)
def test_per_expert_nfn_matches_brute_force(name):
    model = archs.build(name)
    stats = collect(model, name, _batches())
    reference = brute_force(model, name, _batches())
    assert set(stats.stats) == set(reference) and reference
    for key, (nfn, count) in reference.items():
        s = stats.stats[key]
        assert s.count.tolist() == count.tolist(), key
        torch.testing.assert_close(torch.from_numpy(s.expert_nfn), nfn, rtol=1e-5, atol=0)
        token_weighted = float((nfn * count).sum() / count.sum())
        assert s.nfn == pytest.approx(token_weighted, rel=1e-5)
        assert s.calls == 2


def test_padding_is_excluded_and_every_routed_pair_counted():
    model = archs.build("mixtral")
    stats = collect(model, "mixtral", _batches())
    top_k = model.config.num_experts_per_tok
    for s in stats.stats.values():
        assert s.tokens == sum(LENGTHS) * top_k


def test_layout_of_the_stacked_weights():
    """(E, d_out, d_in) whatever the storage: gpt-oss stores (E, d_in, d_out)."""
    for name in ("mixtral", "gpt_oss"):
        config = archs.config(name)
        stats = ExpertStats(find_experts(archs.build(name))).stats
        intermediate = config.intermediate_size
        hidden = config.hidden_size
        experts = config.num_local_experts
        gate_up = next(s for k, s in stats.items() if k.endswith("gate_up_proj"))
        down = next(s for k, s in stats.items() if k.endswith("down_proj"))
        assert gate_up.shape == (experts, 2 * intermediate, hidden)
        assert down.shape == (experts, hidden, intermediate)
        assert gate_up.lora_params_per_rank == experts * (2 * intermediate + hidden)


def test_hooks_are_removed_even_when_the_forward_raises():
    model = archs.build("qwen3_moe")
    experts = find_experts(model)
    with pytest.raises(RuntimeError, match="boom"):
        with ExpertStats(experts):
            assert all(m._forward_pre_hooks for m in experts.values())
            raise RuntimeError("boom")
    assert not any(m._forward_pre_hooks for m in experts.values())


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss", "llama4_text"])
def test_peft_target_parameters_train_the_experts(name):
    """PEFT wraps the 3-D parameters named by their suffix, and one backward step reaches the
    LoRA factors of every expert (lora_dropout must be 0 for ParamWrapper)."""
    from peft import LoraConfig, get_peft_model

    model = archs.build(name)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=[], init_lora_weights=False,
                        target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    peft_model = get_peft_model(model, config)
    batch = _batches()[0]
    loss = peft_model(**archs.inputs(name, batch), labels=batch["input_ids"]).loss
    loss.backward()
    lora = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * 2 * model.config.num_hidden_layers  # A and B, two weights, every layer
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    assert all(".experts." in n for n in lora)


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_every_experts_implementation_reaches_the_hook(implementation):
    """transformers dispatches the experts' matmuls by ``config._experts_implementation``; the
    hook sits on the module's forward, before that dispatch, so each kernel gives the same sums."""
    model = archs.build("gpt_oss")
    reference = collect(model, "gpt_oss", _batches())
    model.set_experts_implementation(implementation)
    stats = collect(model, "gpt_oss", _batches())
    for key, s in stats.stats.items():
        assert s.count.tolist() == reference.stats[key].count.tolist()
        assert s.nfn == pytest.approx(reference.stats[key].nfn, rel=1e-6)


def test_bootstrap_with_unit_weights_is_the_point_estimate():
    model = archs.build("qwen3_moe")
    with ExpertStats(find_experts(model), n_bootstrap=3) as stats:
        for batch in _batches():
            stats.start_batch(batch["attention_mask"], np.ones((len(batch["input_ids"]), 3)))
            with torch.no_grad():
                model(**archs.inputs("qwen3_moe", batch))
    for s in stats.stats.values():
        np.testing.assert_allclose(s.bootstrap_nfn(), s.nfn, rtol=1e-6)


def test_diagnose_reports_the_experts_with_a_per_expert_breakdown(tmp_path):
    from plop import Report, diagnose

    model = archs.build("mixtral")
    report = diagnose(model, _batches(), n_bootstrap=20)
    experts = {m.type: m for m in report.modules if m.experts}
    assert set(experts) == {"experts.gate_up_proj", "experts.down_proj"}
    stats = collect(archs.build("mixtral"), "mixtral", _batches())
    for m in report.modules:
        if m.experts:
            assert m.nfn == pytest.approx(stats.stats[m.name].nfn, rel=1e-6)
            assert len(m.expert_nfn) == model.config.num_local_experts
            assert m.token_count == sum(LENGTHS) * model.config.num_experts_per_tok
    probabilities = {t.type: t.selection_probability for t in report.types}
    assert all(probabilities[t] is not None for t in experts)  # the experts are resampled too
    again = Report.load(report.save(tmp_path / "r.json"))
    assert again.modules == report.modules


def test_train_puts_lora_on_the_expert_weights_and_refuses_dora(tmp_path):
    import tiny_lm

    from plop.errors import ConfigError
    from plop.finetune.config import TrainConfig
    from plop.placement import LoraSettings
    from plop.finetune.trainer import train

    config = TrainConfig(lora=LoraSettings(r=2), steps=2, batch_size=4, output_dir=str(tmp_path / "run"))
    result = train(archs.build("mixtral"), tiny_lm.make_tokenizer(), tiny_lm.examples(12), config, placement="mlp",
                   progress=False)
    assert result.summary["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    assert result.model.peft_config["default"].lora_dropout == 0.0
    assert any(".experts.lora_A" in n for n, p in result.model.named_parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="DoRA"):
        train(archs.build("mixtral"), tiny_lm.make_tokenizer(), tiny_lm.examples(12),
              TrainConfig(lora=LoraSettings(r=2, use_dora=True), steps=1, output_dir=str(tmp_path / "dora")), placement="mlp",
              progress=False)


def test_llama4_experts_stay_recognised_while_peft_parametrizes_them():
    """PEFT's ParamWrapper turns Llama4TextExperts into a Parametrized subclass while its adapters
    are active: the experts are still found, measured on their own layout, and equal to the base
    model's numbers when the adapters are zero."""
    from peft import LoraConfig, get_peft_model

    base_stats = collect(archs.build("llama4_text"), "llama4_text", _batches())
    model = get_peft_model(archs.build("llama4_text"), LoraConfig(
        r=2, target_modules=[], target_parameters=["feed_forward.experts.gate_up_proj"]))
    stats = {k.removeprefix("base_model.model.").replace(".base_layer", ""): s  # found by PEFT's base layer
             for k, s in collect(model, "llama4_text", _batches()).stats.items()}
    assert set(stats) == set(base_stats.stats)
    for key, s in base_stats.stats.items():
        np.testing.assert_allclose(stats[key].sums, s.sums, rtol=1e-6)
