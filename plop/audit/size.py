"""The size of the model a ``config.json`` describes, estimated from its numbers before anything is built.

The meta device stores no weights, but each module is a Python object and each parameter a shape:
``num_hidden_layers: 10000000`` grows plop by about 30 MB/s without end, and ``vocab_size: 1e15``
builds and is reported as 128 quadrillion parameters. So the numbers are read first (torch-free),
the model's size estimated generously (attention as four projections, every expert a gated MLP,
the embeddings untied, every layer field summed), and an absurd size refused in one line that names
the field it comes from. The published configs in tests/fixtures estimate within a factor 1.5 of their
built size (tests/test_check_hostile.py), far under the caps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelError

MAX_PARAMETERS = 10**13
"""5x the largest published model (Llama-4 Behemoth, about 2e12 parameters); DeepSeek-V3 (671e9)
estimates at 7.0e11 here. Beyond it a count is a typo or an attack, not a model anyone trains."""

MAX_MODULES = 300_000
"""About 4x the largest published module trees, counting each expert as three linear modules (as
transformers builds some MoE models): Kimi-K2 (61 layers of 384 experts) and Qwen3-Next (48 of 512)
estimate near 75,000, DeepSeek-V3 at 48,000. It also bounds what a config just under it costs: the
meta build makes about 5,000 modules a second in about 4.5 KB each (2,000 small Llama layers:
26,000 modules, 4.6 s, 115 MB), so at most about a minute and 1.5 GB."""

# the keys transformers' configs use for each number (its attribute_map aliases and the older
# GPT-2/T5/BART/ViT names), searched in every nested config (text_config, vision_config, ...)
KEYS = {
    "hidden": ("hidden_size", "d_model", "n_embd", "embed_dim"),
    "layers": ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "num_decoder_layers", "encoder_layers",
               "decoder_layers", "depth"),
    "ffn": ("intermediate_size", "d_ff", "n_inner", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim"),
    "expert_ffn": ("moe_intermediate_size", "expert_intermediate_size"),
    "experts": ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"),
    "shared": ("n_shared_experts", "num_shared_experts"),
    "heads": ("num_attention_heads", "n_head", "encoder_attention_heads", "decoder_attention_heads"),
    "head_dim": ("head_dim",),
    "layer_list": ("layers_block_type", "layer_types", "hybrid_override_pattern"),  # one entry a layer
    "vocab": ("vocab_size",),
}
# about the largest value of each number in a published model, only to name the field an absurd
# size comes from: the one furthest above its largest (Llama-3.1-405B's width and MLP, Gemma-3's
# vocabulary, Qwen3-Next's 512 experts)
LARGEST = {"hidden": 16_384, "layers": 128, "ffn": 53_248, "expert_ffn": 8_192, "experts": 512, "shared": 8,
           "heads": 128, "head_dim": 512, "vocab": 262_144, "layer_list": 128}
DEFAULT_HIDDEN = 4096  # most transformers configs' default width (Llama's, Mistral's, Qwen2's)


@dataclass
class Estimate:
    """An estimate of a model's parameters and modules, and the numbers it was made from
    (``text_config.num_hidden_layers`` -> (kind, value))."""

    parameters: int = 0
    modules: int = 0
    fields: dict[str, tuple[str, int | float]] = field(default_factory=dict)

    def culprit(self) -> str:
        """The field furthest above the largest value of its kind in a published model."""
        # as logarithms: a number may be an integer of thousands of digits, past a float's range
        return max(self.fields, key=lambda name: math.log10(max(self.fields[name][1], 1)) -
                   math.log10(LARGEST[self.fields[name][0]]))


def _numbers(config: Mapping, prefix: str, estimate: Estimate) -> dict[str, int]:
    """``config``'s own size numbers by kind (a kind given twice: the largest; layers: summed, as an
    encoder-decoder gives each stack its own; a per-layer list: its length), recorded into ``estimate.fields``."""
    found: dict[str, int] = {}
    for kind, keys in KEYS.items():
        for key in keys:
            value = config.get(key)
            if kind == "layer_list" and isinstance(value, (list, str)):
                value = len(value)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # not a size: transformers says what it expected when it builds the config
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{prefix}{key} = {value} is not a size")
            estimate.fields[prefix + key] = (kind, value)
            count = max(int(value), 0)
            found[kind] = found.get(kind, 0) + count if kind == "layers" else max(found.get(kind, 0), count)
    return found


def _configs(config: Mapping, prefix: str, estimate: Estimate) -> list[dict[str, int]]:
    """The size numbers of ``config`` and of every config nested in it (text_config, vision_config, ...)."""
    found = [_numbers(config, prefix, estimate)]
    for key, value in config.items():
        if isinstance(value, Mapping):  # nesting is bounded: the file was parsed under MAX_NESTING
            found += _configs(value, f"{prefix}{key}.", estimate)
    return found


def estimate(config: Mapping[str, Any]) -> Estimate:
    """An estimate of the size of the model ``config`` (a parsed ``config.json``) describes, from the
    numbers it holds (what it leaves out takes transformers' defaults, real models' sizes);
    ``ValueError`` for a size that is not a finite number."""
    found = Estimate()
    configs = _configs(config, "", found)
    # a VLM may give the vocabulary at the top and the width in text_config; a config with no width
    # at all gets transformers' usual default
    width = max((n.get("hidden", 0) for n in configs), default=0) or DEFAULT_HIDDEN
    found.parameters = 2 * max(n.get("vocab", 0) for n in configs) * width
    for n in configs:
        layers = max(n.get("layers", 0), n.get("layer_list", 0))  # a per-layer list repeats the count
        h = n.get("hidden", width)
        attention = 4 * h * max(h, n.get("heads", 0) * n.get("head_dim", 0))
        experts = n.get("experts", 0) + n.get("shared", 0)
        ffn = n.get("ffn", 4 * h)
        found.parameters += layers * (attention + 3 * h * ffn + 3 * h * n.get("expert_ffn", ffn) * experts)
        found.modules += layers * (16 + 3 * experts)
    return found


def _short(n: int | float) -> str:
    """``n`` for a one-line message: with commas up to 10^12, else as 1.2e+18, even past a float's range."""
    if n < 10**12 and n == int(n):
        return f"{int(n):,}"
    exponent = math.log10(n)  # exact enough on integers of any length, where float(n) overflows
    return f"{10 ** (exponent % 1):.1f}e+{int(exponent)}"


def check_size(config: Mapping[str, Any], source: str) -> Estimate:
    """:func:`estimate`, refused in one :class:`ModelError` when over :data:`MAX_PARAMETERS` or :data:`MAX_MODULES`."""
    try:
        found = estimate(config)
    except ValueError as e:
        raise ModelError(f"{source}: {e}") from None
    if found.parameters > MAX_PARAMETERS or found.modules > MAX_MODULES:
        name = found.culprit()
        size = (f"{_short(found.parameters)} parameters, over the {_short(MAX_PARAMETERS)} plop check builds (the "
                "largest published models have about 2e+12)" if found.parameters > MAX_PARAMETERS else
                f"{_short(found.modules)} modules, over the {MAX_MODULES:,} plop check builds (the largest "
                "published models have under 80,000)")
        raise ModelError(f"{source}: {name} = {_short(found.fields[name][1])} makes a model of about {size}")
    return found
