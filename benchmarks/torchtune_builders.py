"""Derive plop's torchtune table from torchtune's own LoRA builders: ``python benchmarks/torchtune_builders.py``
writes ``plop/resources/torchtune_builders.json`` (needs the ``stack-torchtune`` extra).

Every ``lora_*`` / ``qlora_*`` builder a ``torchtune.models`` family exports is built on the meta
device once with every switch on, then once per switch (each of ``lora_attn_modules``,
``apply_lora_to_mlp``, ``apply_lora_to_output``) and, for Llama-3.2 Vision, once per part
(``decoder_trainable`` / ``encoder_trainable`` / ``fusion_trainable`` = "lora"): which modules
each switch wraps is read off what torchtune built, never typed in. tests/test_torchtune_stack.py
rebuilds it and fails when torchtune registers a builder the table lacks.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import json
import pkgutil
import re
import sys
import types
from pathlib import Path

TABLE = Path(__file__).resolve().parent.parent / "plop" / "resources" / "torchtune_builders.json"
SWITCHES = ("q_proj", "k_proj", "v_proj", "output_proj", "mlp", "output")
PARTS = ("decoder", "encoder", "fusion")  # Llama-3.2 Vision's *_trainable flags


class _Absent(types.ModuleType):
    """A module whose every attribute is another placeholder (annotations, ``from ... import``)."""

    def __getattr__(self, name: str) -> "_Absent":
        if name.startswith("__"):  # what import machinery and inspect probe for
            raise AttributeError(name)
        return _Absent(f"{self.__name__}.{name}")


def import_torchtune_models() -> dict[str, types.ModuleType]:
    """Every family of ``torchtune.models`` by name. Their image transforms import torchvision at
    import time (never their builders); the PyPI torchvision wheels for torch 2.13 need the CUDA
    torch, so on a CPU torch an empty placeholder stands in while torchtune's families are
    imported, enough for ``import`` and nothing else, and is taken away after (transformers and
    datasets ask importlib whether torchvision exists)."""
    placeholders = ("torchvision", "torchvision.transforms", "torchvision.transforms.v2")
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError):
        import datasets  # noqa: F401  (torchtune imports it; it probes for torchvision as it loads)

        sys.modules.update({name: _Absent(name) for name in placeholders if name not in sys.modules})
    try:
        import torchtune.models

        return {info.name: importlib.import_module(f"torchtune.models.{info.name}")
                for info in pkgutil.iter_modules(torchtune.models.__path__)}
    finally:
        for name in placeholders:
            if isinstance(sys.modules.get(name), _Absent):
                del sys.modules[name]


def lora_builders() -> dict[str, object]:
    """Every LoRA model builder torchtune registers, by its ``_component_`` path: ``lora_*`` and
    ``qlora_*`` names a family exports whose only required argument is ``lora_attn_modules``
    (``lora_llama2`` and the like take every dimension: component builders, not models)."""
    found = {}
    for family_name, family in import_torchtune_models().items():
        for name in getattr(family, "__all__", ()):
            builder = getattr(family, name)
            required = [p.name for p in inspect.signature(builder).parameters.values() if p.default is p.empty]
            if name.startswith(("lora_", "qlora_")) and required == ["lora_attn_modules"]:
                found[f"torchtune.models.{family_name}.{name}"] = builder
    return found


def _build(builder, switches: set[str], parts: set[str] | None):
    import torch

    kwargs = {"lora_attn_modules": [s for s in SWITCHES[:4] if s in switches], "apply_lora_to_mlp": "mlp" in switches}
    if "output" in switches or "apply_lora_to_output" in inspect.signature(builder).parameters:
        kwargs["apply_lora_to_output"] = "output" in switches  # Gemma's builders have no such argument
    if parts is not None:
        kwargs.update({f"{p}_trainable": "lora" if p in parts else "frozen" for p in PARTS})
    with torch.device("meta"):
        return builder(**kwargs)


def _adapted(model) -> dict[str, tuple[int, int, bool]]:
    """The modules holding what torchtune's get_adapter_params returns (what its LoRA recipes
    train): (in, out, bias) by name."""
    from torchtune.modules.peft import get_adapter_params

    owners = {re.sub(r"\.(lora_[ab]|magnitude)(\.weight)?$", "", key) for key in get_adapter_params(model)}
    modules = dict(model.named_modules())
    return {name: (modules[name].in_dim, modules[name].out_dim, modules[name].use_bias) for name in owners}


def _linears(model) -> dict[str, tuple[int, int, bool]]:
    """Every plain linear layer outside the adapters (what stays frozen), by name."""
    from torch import nn

    return {name: (m.in_features, m.out_features, m.bias is not None) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not re.search(r"\.lora_[ab]$", name)}


def _compress(rows: dict[str, dict]) -> dict[str, dict]:
    """Names with their indices collapsed: ``layers.{}.attn.q_proj`` -> ``{"at": "0-31", ...}``."""
    grouped: dict[str, dict] = {}
    for name, row in rows.items():
        pattern = re.sub(r"(?<=\.)\d+(?=\.|$)", "{}", name)
        index = ".".join(re.findall(r"(?<=\.)(\d+)(?=\.|$)", name))
        entry = grouped.setdefault(pattern, {**row, "at": []})
        if entry != {**row, "at": entry["at"]}:
            raise ValueError(f"{pattern}: shapes differ across layers; extend the table's format")
        if index:
            entry["at"].append(index)
    for entry in grouped.values():
        entry["at"] = _ranges(entry["at"])
    return grouped


def _ranges(indices: list[str]) -> str:
    """``0-31``, ``3,8,13``: runs of single indices as ranges, dotted ones as they are."""
    if not all(i.isdigit() for i in indices):
        return ",".join(indices)
    out: list[str] = []
    for i in sorted(map(int, indices)):
        if out and "-" in out[-1] and int(out[-1].split("-")[1]) == i - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        elif out and "-" not in out[-1] and int(out[-1]) == i - 1:
            out[-1] = f"{out[-1]}-{i}"
        else:
            out.append(str(i))
    return ",".join(out)


def _refusal(builder, switches: set[str], parts: set[str] | None) -> str | None:
    """torchtune's own message when the builder refuses these switches (no attention projection;
    an output projection on a tied head), else None."""
    try:
        _build(builder, switches, parts)
    except (ValueError, AssertionError, TypeError) as e:
        return str(e).strip().splitlines()[0]
    return None


def derive(builder) -> dict:
    """One builder's entry: its linear layers (adapted or not) with the switch and part that wrap
    each, and the switches torchtune refuses. A builder needs one attention projection at least,
    so what ``mlp`` or ``output`` wraps is read as what they add to ``q_proj`` alone."""
    vision = "decoder_trainable" in inspect.signature(builder).parameters
    parts = set(PARTS) if vision else None
    refuses = {"output": _refusal(builder, {"q_proj", "output"}, parts), "no_attention": _refusal(builder, {"mlp"}, parts)}
    refuses = {k: v for k, v in refuses.items() if v}
    every = set(SWITCHES) - ({"output"} if "output" in refuses else set())
    full = _build(builder, every, parts)
    alone = set(_adapted(_build(builder, {"q_proj"}, parts)))
    switch = {name: "q_proj" for name in alone}
    for s in every - {"q_proj"}:
        switch |= {name: s for name in set(_adapted(_build(builder, {"q_proj", s}, parts))) - alone}
    part = {name: p for p in PARTS if vision for name in _adapted(_build(builder, every, {p}))}
    rows = {name: {"shape": [i, o], "bias": b, "switch": switch[name], **({"part": part[name]} if vision else {})}
            for name, (i, o, b) in _adapted(full).items()}
    rows |= {name: {"shape": [i, o], "bias": b} for name, (i, o, b) in _linears(full).items()}
    lora = sum(p.numel() for name, p in full.named_parameters() if re.search(r"\.(lora_[ab]|magnitude)\b", name))
    return {"parameters": sum(p.numel() for p in full.parameters()) - lora, "modules": _compress(rows),
            **({"refuses": refuses} if refuses else {})}


def recipe_truth(model_block: dict) -> tuple[set[str], int]:
    """What torchtune's LoRA recipes train for a recipe's ``model:`` block: the builder it names,
    instantiated by torchtune's own config system on the meta device, then the recipes' own
    ``set_trainable_params(model, get_adapter_params(model))``; the adapted modules' names and the
    trainable count."""
    import torch
    from omegaconf import OmegaConf
    from torchtune import config
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    import_torchtune_models()
    with torch.device("meta"):
        model = config.instantiate(OmegaConf.create(dict(model_block)))
    set_trainable_params(model, get_adapter_params(model))
    return set(_adapted(model)), sum(p.numel() for p in model.parameters() if p.requires_grad)


def table() -> dict:
    """Every builder's entry; a ``qlora_*`` builder is its LoRA builder with ``quantize_base=True``
    (a ``functools.partial``), which changes how frozen weights are stored, not what trains: it is
    derived once, through the builder it wraps."""
    entries: dict = {}
    builders: dict = {}
    for path, builder in sorted(lora_builders().items()):
        base = getattr(builder, "func", builder)
        rest = {k: v for k, v in getattr(builder, "keywords", {}).items() if k != "quantize_base"}
        key = (base, tuple(sorted(rest.items())))
        if key not in entries:
            entries[key] = derive(functools.partial(base, **rest) if rest else base)
            print(f"derived {path}", file=sys.stderr)
        builders[path] = entries[key]
    return {"torchtune": _installed_version(), "builders": builders}


def _installed_version() -> str:
    from importlib.metadata import version

    return version("torchtune")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(TABLE))
    args = parser.parse_args()
    Path(args.out).write_text(json.dumps(table(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
