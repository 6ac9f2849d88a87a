"""The forward-hook collector on real models: hook lifecycle, padding, memory, module discovery,
precision, and agreement with an independent NFN computation."""

from __future__ import annotations

import copy
import gc
import tracemalloc

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_batches, pad_batches
from plop import diagnose
from plop.measure.collector import NFNCollector
from plop.measure.hooks import Hooks
from plop.errors import NonFiniteError, PlopError
from plop.model.layers import find_linear_modules
from plop.model.names import layer_index


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


def _nfn(report) -> dict[str, float]:
    return {m.name: m.nfn for m in report.modules}


# -- hook lifecycle ---------------------------------------------------------------------------
def test_hooks_removed_after_success(tiny_llama, batches):
    modules = find_linear_modules(tiny_llama)
    with NFNCollector(modules) as collector:
        assert collector.active
        assert all(len(m._forward_hooks) == 1 for m in modules.values())
        for batch in batches(8, 16):
            collector.start_batch(batch["attention_mask"])
            tiny_llama.model(**batch)
    assert not collector.active
    assert _no_hooks(tiny_llama)
    assert collector._cached_input is None and collector._cached_rows is None


def test_hooks_removed_after_exception_in_with_block(tiny_llama, batches):
    modules = find_linear_modules(tiny_llama)
    with pytest.raises(RuntimeError, match="user code failed"):
        with NFNCollector(modules) as collector:
            collector.start_batch(batches(2, 8)[0]["attention_mask"])
            tiny_llama.model(**batches(2, 8)[0])
            raise RuntimeError("user code failed")
    assert _no_hooks(tiny_llama)
    assert collector._cached_input is None


def test_hooks_removed_after_exception_in_forward(tiny_llama, batches):
    """A forward that fails half-way (after some hooked modules ran) through diagnose."""
    mlp = tiny_llama.model.layers[1].mlp
    original = mlp.forward

    def broken(x):
        original(x)
        raise RuntimeError("forward failed")

    mlp.forward = broken
    tiny_llama.train()
    with pytest.raises(RuntimeError, match="forward failed"):
        diagnose(tiny_llama, batches(4, 8))
    assert _no_hooks(tiny_llama)
    assert tiny_llama.training  # restored on failure too
    mlp.forward = original


def test_hooks_removed_when_a_hook_raises(tiny_llama, batches):
    with torch.no_grad():
        tiny_llama.model.layers[0].self_attn.v_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="v_proj"):
        diagnose(tiny_llama, batches(4, 8))
    assert _no_hooks(tiny_llama)


def test_hooks_registered_before_a_failing_one_are_removed(tiny_llama):
    """The lifecycle the collector and the experts share: a failure half-way through registering
    leaves none of the hooks already on the model."""
    modules = list(find_linear_modules(tiny_llama).values())

    class FailsAtTheLast(Hooks):
        def register(self):
            for module in modules[:-1]:
                yield module.register_forward_hook(lambda *args: None)
            raise RuntimeError("cannot hook the last one")

    with pytest.raises(RuntimeError, match="cannot hook the last one"):
        with FailsAtTheLast():
            pass
    assert _no_hooks(tiny_llama)


def test_collector_rejects_bad_arguments(tiny_llama):
    with pytest.raises(ValueError, match="estimator"):
        NFNCollector(find_linear_modules(tiny_llama), estimator="exact")
    with pytest.raises(ValueError, match="no linear modules"):
        NFNCollector({})


# -- agreement with an independent computation ------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_nfn_matches_independent_computation(arch, tiny_llama, tiny_gpt2, tiny_bert, reference):
    model = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}[arch]
    data = make_batches(12, lengths=[5 + 3 * i for i in range(12)], batch_size=4)  # ragged, padded
    report = diagnose(model, data, n_bootstrap=10)
    body = {"llama": "model", "gpt2": "transformer", "bert": None}[arch]
    body = getattr(model, body) if body else model
    expected = reference(model, lambda b: body(**b), data, [m.name for m in report.modules])
    n_tokens = sum(int(b["attention_mask"].sum()) for b in data)
    assert report.data["token_count"] == n_tokens
    for m in report.modules:
        assert m.nfn == pytest.approx(expected[m.name]["nfn"], rel=1e-5), m.name
        assert m.baseline == pytest.approx(expected[m.name]["baseline"], rel=1e-9), m.name
        assert m.token_count == expected[m.name]["tokens"]
        assert m.calls == expected[m.name]["calls"] == len(data)


# -- padding ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_padding_invariance(arch, tiny_llama, tiny_gpt2, tiny_bert):
    """Texts fed one at a time (no padding) vs together in one right-padded batch: the same
    tokens, so the same NFN for every module."""
    model = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}[arch]
    g = torch.Generator().manual_seed(31)
    seqs = [torch.randint(3, 500, (n,), generator=g) for n in (7, 23, 15, 30)]
    alone = diagnose(model, pad_batches(seqs, batch_size=1), n_bootstrap=10)
    together_batches = pad_batches(seqs, batch_size=4, pad_id=0)
    assert int((together_batches[0]["attention_mask"] == 0).sum()) > 0
    together = diagnose(model, together_batches, n_bootstrap=10)
    assert alone.data["token_count"] == together.data["token_count"] == 75
    a, b = _nfn(alone), _nfn(together)
    assert a.keys() == b.keys()
    for name in a:
        assert b[name] == pytest.approx(a[name], rel=1e-5), name
    for ma, mb in zip(alone.modules, together.modules):
        if ma.layer is not None:  # per-token modules; BERT's pooler sees one vector per sequence
            assert ma.token_count == mb.token_count == 75


def test_padding_tokens_do_not_count_even_with_extreme_pad_embeddings(tiny_llama):
    """Make the pad token's embedding huge and aligned: if padding leaked into the statistics,
    the NFN of the first layer would jump."""
    g = torch.Generator().manual_seed(32)
    seqs = [torch.randint(3, 500, (n,), generator=g) for n in (6, 20)]
    clean = diagnose(tiny_llama, pad_batches(seqs, batch_size=1), n_bootstrap=10)
    with torch.no_grad():
        tiny_llama.model.embed_tokens.weight[0] = 1e3 * tiny_llama.model.layers[0].self_attn.q_proj.weight[0]
    padded = diagnose(tiny_llama, pad_batches(seqs, batch_size=2, pad_id=0), n_bootstrap=10)
    for name, value in _nfn(clean).items():
        assert _nfn(padded)[name] == pytest.approx(value, rel=1e-5), name


# -- memory -----------------------------------------------------------------------------------
def _footprint(collector: NFNCollector) -> dict[str, tuple]:
    """Shapes of every array/tensor the collector holds (the model's modules aside)."""
    out = {}
    for name, s in collector.stats.items():
        for attr in ("sums", "boot_sum", "boot_count"):
            out[f"{name}.{attr}"] = getattr(s, attr).shape
    for key, value in vars(collector).items():
        if isinstance(value, (np.ndarray, torch.Tensor)):
            out[key] = tuple(value.shape)
    return out


@torch.no_grad()
def _run(model, collector, data):
    for batch in data:
        collector.start_batch(batch["attention_mask"])
        model.model(**batch)


@pytest.mark.heavy
def test_memory_does_not_grow_with_batches(tiny_llama):
    modules = find_linear_modules(tiny_llama)
    short, long = make_batches(16, 32, seed=1), make_batches(160, 32, seed=2)
    with NFNCollector(modules, n_bootstrap=50) as few:
        _run(tiny_llama, few, short)
    with NFNCollector(modules, n_bootstrap=50) as many:
        _run(tiny_llama, many, long)
    assert many.samples == 10 * few.samples
    assert _footprint(few) == _footprint(many)
    for s in many.stats.values():
        assert s.boot_sum.shape == (50,) and s.sums.dtype == np.float64
    assert many._cached_input is None and many._cached_rows is None

    # the Python heap does not grow with the number of batches either
    with NFNCollector(modules, n_bootstrap=50) as collector:
        _run(tiny_llama, collector, short)  # warm up
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            _run(tiny_llama, collector, long)
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
    growth = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    # storing even one float64 per token and module would add 160*32*14*8 = 573 kB
    assert growth < 100_000


# -- bootstrap accumulators -------------------------------------------------------------------
def test_bootstrap_replicates_are_poisson_weighted_per_sample_ratios():
    """Replicate j's NFN is sum_i w_ij S_i / sum_i w_ij C_i / baseline, with S_i, C_i sample i's
    ratio sum and token count and w_ij ~ Poisson(1) drawn per sample from the collector's seed."""
    torch.manual_seed(34)
    linear = nn.Linear(16, 24)
    lengths = [[5, 2, 7], [1, 7, 4, 6]]
    n_boot, seed = 64, 9
    rng = np.random.default_rng(seed)
    sums, counts, weights = [], [], []
    with NFNCollector({"p": linear}, n_bootstrap=n_boot, seed=seed) as collector, torch.no_grad():
        for batch_lengths in lengths:
            x = torch.randn(len(batch_lengths), 7, 16)
            mask = (torch.arange(7)[None, :] < torch.tensor(batch_lengths)[:, None]).long()
            collector.start_batch(mask)
            linear(x)
            w = linear.weight.double()
            ratio = torch.linalg.vector_norm(x.double() @ w.T, dim=-1) / torch.linalg.vector_norm(x.double(), dim=-1)
            sums += (ratio * mask).sum(1).tolist()
            counts += mask.sum(1).tolist()
            weights.append(rng.poisson(1.0, size=(len(batch_lengths), n_boot)))
    weights = np.concatenate(weights)
    baseline = torch.linalg.matrix_norm(linear.weight.double()).item() / 4.0  # sqrt(d_in = 16)
    expected = (np.array(sums) @ weights) / (np.array(counts) @ weights) / baseline
    stats = collector.stats["p"]
    np.testing.assert_allclose(stats.bootstrap_nfn(), expected, rtol=1e-5)
    assert stats.nfn == pytest.approx(sum(sums) / sum(counts) / baseline, rel=1e-5)
    assert stats.count == sum(counts) == 32 and collector.samples == 7 and collector.tokens == 32


# -- repeated calls ---------------------------------------------------------------------------
class TwiceApplied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(33)
        self.embed = nn.Embedding(500, 32)
        self.shared = nn.Linear(32, 32)
        self.once = nn.Linear(32, 32)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        return self.once(self.shared(torch.tanh(self.shared(h))))


def test_module_called_twice_accumulates_both_calls(reference):
    model = TwiceApplied()
    data = make_batches(8, lengths=[4, 9, 12, 3, 10, 11, 5, 8], batch_size=4)
    report = diagnose(model, data, n_bootstrap=10)
    records = {m.name: m for m in report.modules}
    n_tokens = report.data["token_count"]
    assert n_tokens == 62
    assert records["shared"].calls == 2 * len(data) and records["shared"].token_count == 2 * n_tokens
    assert records["once"].calls == len(data) and records["once"].token_count == n_tokens
    expected = reference(model, lambda b: model(**b), data, ["shared", "once"])
    assert expected["shared"]["tokens"] == 2 * n_tokens
    for name in ("shared", "once"):
        assert records[name].nfn == pytest.approx(expected[name]["nfn"], rel=1e-5)


# -- non-finite values ------------------------------------------------------------------------
@pytest.mark.parametrize(("module", "value"), [("model.layers.0.self_attn.q_proj", float("inf")),
                                               ("model.layers.1.mlp.up_proj", float("nan"))])
def test_non_finite_raises_naming_the_module(tiny_llama, batches, module, value):
    with torch.no_grad():
        dict(tiny_llama.named_modules())[module].weight[3, 5] = value
    with pytest.raises(NonFiniteError, match=module.replace(".", r"\.")) as raised:
        diagnose(tiny_llama, batches(4, 8))
    assert isinstance(raised.value, PlopError)  # the CLI's one-line contract covers it
    # the error left no hook behind: the model runs on as if never diagnosed
    assert not any(m._forward_hooks for m in tiny_llama.modules())


# -- module discovery -------------------------------------------------------------------------
def test_gpt2_conv1d_modules(tiny_gpt2, batches):
    report = diagnose(tiny_gpt2, batches(8, 16), n_bootstrap=10)
    expected = {  # (d_in, d_out) for n_embd=64
        "attn.c_attn": (64, 192), "attn.c_proj": (64, 64), "mlp.c_fc": (64, 256), "mlp.c_proj": (256, 64),
    }
    names = {f"transformer.h.{i}.{suffix}" for i in range(2) for suffix in expected}
    assert {m.name for m in report.modules} == names
    modules = dict(tiny_gpt2.named_modules())
    for m in report.modules:
        suffix = m.name.split(".", 3)[3]
        assert (m.d_in, m.d_out) == expected[suffix]
        assert (m.d_in, m.d_out) == tuple(modules[m.name].weight.shape)  # Conv1D weight is (d_in, d_out)
        assert m.type == (suffix if suffix.endswith("c_proj") else suffix.rsplit(".", 1)[1])  # roles apart
        assert m.layer == int(m.name.split(".")[2])
    assert {t.type for t in report.types} == {"c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"}
    c_proj = next(t for t in report.types if t.type == "mlp.c_proj")
    assert c_proj.n_modules == 2  # the attention's c_proj is a type of its own
    assert c_proj.lora_params_per_rank == 2 * (256 + 64)


def test_bert_module_names(tiny_bert, batches):
    report = diagnose(tiny_bert, batches(8, 16), n_bootstrap=10)
    records = {m.name: m for m in report.modules}
    assert {m.type for m in report.modules} == {"query", "key", "value", "attention.output.dense",
                                                "intermediate.dense", "output.dense", "pooler.dense"}
    for i in range(2):
        for sub, (d_in, d_out) in {"attention.self.query": (64, 64), "attention.self.key": (64, 64),
                                   "attention.self.value": (64, 64), "attention.output.dense": (64, 64),
                                   "intermediate.dense": (64, 128), "output.dense": (128, 64)}.items():
            m = records[f"encoder.layer.{i}.{sub}"]
            assert m.layer == i and (m.d_in, m.d_out) == (d_in, d_out)
    assert records["pooler.dense"].layer is None
    assert records["pooler.dense"].token_count == 8  # one pooled vector per sequence
    assert len(records) == 13


def test_layer_index():
    assert layer_index("model.layers.12.self_attn.q_proj") == 12
    assert layer_index("transformer.h.3.mlp.c_fc") == 3
    assert layer_index("encoder.layer.7.output.dense") == 7
    assert layer_index("blocks.0.attn.qkv") == 0
    assert layer_index("lm_head") is None
    assert layer_index("model.height.2.x") is None


def test_lm_head_excluded_by_default_and_included_on_request(tiny_llama, batches):
    data = batches(4, 16)
    default = diagnose(tiny_llama, data, n_bootstrap=10)
    assert "lm_head" not in {m.name for m in default.modules}
    assert "lm_head" not in find_linear_modules(tiny_llama)
    with_head = diagnose(tiny_llama, data, n_bootstrap=10, include_head=True)
    head = next(m for m in with_head.modules if m.name == "lm_head")
    assert (head.d_in, head.d_out) == (64, 500)
    assert head.token_count == 64 and head.layer is None
    # the body's modules are measured identically either way
    for name, value in _nfn(default).items():
        assert _nfn(with_head)[name] == pytest.approx(value, rel=1e-9)


def test_tied_gpt2_head_excluded(tiny_gpt2):
    assert "lm_head" not in find_linear_modules(tiny_gpt2)
    assert "lm_head" in find_linear_modules(tiny_gpt2, include_head=True)


def test_peft_wrapped_model_reports_base_layers_under_original_names(tiny_llama):
    from peft import LoraConfig, get_peft_model

    before = set(find_linear_modules(tiny_llama))
    peft_model = get_peft_model(tiny_llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    found = find_linear_modules(peft_model)
    stripped = {name.removeprefix("base_model.model.") for name in found}
    assert stripped == before
    assert not any("lora_" in name or name.endswith("base_layer") for name in found)


# -- precision --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_close_to_float32(tiny_llama, batches, dtype):
    data = batches(16, 32)
    reference = diagnose(tiny_llama, data, n_bootstrap=10)
    low = copy.deepcopy(tiny_llama).to(dtype)
    report = diagnose(low, data, n_bootstrap=10)
    assert report.model["dtype"] == str(dtype).removeprefix("torch.")
    for name, value in _nfn(reference).items():
        assert _nfn(report)[name] == pytest.approx(value, rel=0.03), name


# -- training state ---------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False])
def test_diagnose_restores_training_state(tiny_llama, batches, training):
    tiny_llama.train(training)
    seen = []
    handle = tiny_llama.model.layers[0].register_forward_hook(lambda mod, a, o: seen.append(mod.training))
    try:
        diagnose(tiny_llama, batches(4, 8))
    finally:
        handle.remove()
    assert seen == [False]  # measured in eval mode (no dropout)
    assert tiny_llama.training is training
    assert all(m.training is training for m in tiny_llama.modules())


@pytest.mark.slow
def test_smollm2_batching_invariance(smollm2):
    """Real tokenizer, real model: texts of different lengths diagnosed one at a time and in one
    right-padded batch give the same NFN."""
    from conftest import SHORT_TEXTS

    model, tokenizer = smollm2
    alone = diagnose(model, SHORT_TEXTS, tokenizer, max_length=32, batch_size=1, n_bootstrap=10)
    together = diagnose(model, SHORT_TEXTS, tokenizer, max_length=32, batch_size=8, n_bootstrap=10)
    assert alone.data["token_count"] == together.data["token_count"]
    assert alone.data["samples"] == together.data["samples"] == len(SHORT_TEXTS)
    b = _nfn(together)
    for name, value in _nfn(alone).items():
        assert b[name] == pytest.approx(value, rel=1e-4), name
