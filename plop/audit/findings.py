"""Findings about a build: the config asks for something PEFT does not do (errors), or what it
trains is known to go wrong (warnings). Each says what and where, with numbers."""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import nn

from ..model.names import layer_index
from ..model.layout import ModelLayout
from ..model.roles import peft_matches
from ..stacks.lint import UNSLOTH_FUSED, VLLM_DORA
from ..stacks.peft import VISION_EXCLUDE
from ..stacks.reading import StackConfig
from .resolve import Build
from .result import Finding
from .unsloth import reaches_experts

SEVERITIES = ("error", "warning", "info")
_ROUTER = re.compile(r"Router|Gate$|Gating")


def _owner(key: str, build: Build) -> str:
    """The module a target lives in (a wrapped parameter's module)."""
    return build.wrapped_params.get(key, key)


def native_misses(spec: StackConfig, build: Build) -> list[Finding]:
    """Errors where the stack matched the keys itself (mlx-lm): its refusal, keys that equal no
    path of its model, nothing trained."""
    if build.refused:
        return [Finding("error", "stack-refuses", build.refused)]
    found = []
    if build.missed:
        found.append(Finding("error", "target-miss", f"{len(build.missed)} {spec.stack} keys match no module of its "
                             f"own model, so it skips them without a word and trains the rest: "
                             f"{', '.join(map(repr, build.missed))}; its paths inside a block here are "
                             f"{', '.join(build.inner)}"))
    if not build.ranks:
        found.append(Finding("error", "nothing-trained", "this config trains no parameter of this model"))
    return found


def misses(spec: StackConfig, build: Build, layout: ModelLayout) -> list[Finding]:
    """Errors: names, patterns and copies in the config that reach nothing on this model."""
    if build.missed is not None:
        return native_misses(spec, build)
    found = [Finding("error", "peft-refuses", build.refused)] if build.refused else []
    if build.refused:
        return found
    modules = [k for k in build.ranks if k not in layout.params]
    converted = getattr(build.converted, "target_modules", None) or ()
    # PEFT's transformers-5 MoE conversion moves gate_proj/up_proj/down_proj (w1/w2/w3) entries
    # into target_parameters: such an entry reached the experts if an expert weight was wrapped
    moved_to_experts = bool(getattr(build.converted, "target_parameters", None)) and \
        any(k in layout.params for k in build.ranks)
    substring = spec.stack == "llama-factory" and any("." in t for t in build.lora_config.target_modules or ())
    if isinstance(spec.placement.target_modules, str):
        if not any(peft_matches(k, spec.placement.target_modules) for k in modules) and spec.placement.target_modules != "all-linear":
            found.append(Finding("error", "target-miss", f"target_modules regex {spec.placement.target_modules!r} "
                                 "full-matches no module name of this model, so PEFT adapts nothing with it"))
    for entry in spec.placement.target_modules if isinstance(spec.placement.target_modules, list) else ():
        if entry == "all":
            continue
        hit = any(entry in k for k in modules) if substring else any(peft_matches(k, [entry]) for k in modules)
        if spec.stack == "unsloth" and not hit:
            hit = reaches_experts(entry, {k.rsplit(".", 1)[-1] for k in build.ranks if k in layout.params})
        if not hit and not (moved_to_experts and entry not in converted):
            found.append(Finding("error", "target-miss", f"target {entry!r} matches no module of this model: "
                                 "PEFT skips it without a word and trains the rest"))
    for entry in spec.placement.target_parameters or ():
        if not any(peft_matches(k, [entry]) for k in build.ranks if k in layout.params):
            found.append(Finding("error", "target-miss", f"target parameter {entry!r} matches no expert weight"))
    for label, pattern in (("rank_pattern", spec.placement.rank_pattern), ("alpha_pattern", spec.placement.alpha_pattern)):
        for key in pattern or {}:
            if not any(re.match(rf"(.*\.)?({key})$", k) for k in [*build.ranks, *map(lambda k: _owner(k, build), build.ranks)]):
                found.append(Finding("error", "pattern-miss", f"{label} key {key!r} matches no adapted module: "
                                     f"those modules keep the default {'rank' if label == 'rank_pattern' else 'alpha'}"))
    for entry in getattr(build.lora_config, "modules_to_save", None) or ():  # as the stack hands them to PEFT
        if not any(peft_matches(k, [entry]) for k in build.saved):
            found.append(Finding("error", "save-miss", f"modules_to_save {entry!r} matches no module: nothing is copied"))
    if not build.ranks and not build.saved:
        found.append(Finding("error", "nothing-trained", "this config trains no parameter of this model"))
    return found


def _share(n: int, total: int) -> str:
    return f"{100 * n / total:.0f} %" if total else "0 %"


def _layers_text(layers: list[int]) -> str:
    """``0-15`` for a run, else the list."""
    if layers and layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}-{layers[-1]}"
    return ", ".join(map(str, layers))


def expert_findings(build: Build, layout: ModelLayout, block_weights: int) -> list[Finding]:
    """Routed experts left frozen while the dense parts train (mlx-lm #571, unsloth #4476)."""
    if not layout.params or not build.ranks:
        return []
    frozen: dict[str, int] = {}
    for name, shape in layout.params.items():
        if name not in build.ranks:
            frozen[layout.role_map[name]] = frozen.get(layout.role_map[name], 0) + shape[0] * shape[1] * shape[2]
    if not frozen:
        return []
    total = sum(s[0] * s[1] * s[2] for s in layout.params.values())
    every = sum(frozen.values()) == total
    what = "the routed experts get no adapter" if every else f"{', '.join(sorted(frozen))} get no adapter"
    return [Finding("warning", "experts-frozen",
                    f"{what}: {_share(sum(frozen.values()), block_weights)} of the block weights stay untouched "
                    f"while the rest trains; add them with "
                    + (f"keys {build.expert_keys}" if build.expert_keys else f"target_parameters {sorted(frozen)}"))]


def placement_findings(model: nn.Module, build: Build, layout: ModelLayout) -> list[Finding]:
    """Routers, vision tower, head and embeddings adapted; full copies and their size."""
    found = []
    modules = dict(model.named_modules())
    classes = {name: type(m).__name__ for name, m in modules.items()}
    routers = sorted({_type(k, layout) for k in build.ranks if layout.params and (
        _ROUTER.search(classes.get(_owner(k, build), "")) or _owner(k, build).rsplit(".", 1)[-1] in ("gate", "router"))})
    if routers:
        found.append(Finding("warning", "router-wrapped", f"the MoE router {', '.join(routers)} gets LoRA: which "
                             "experts each token reaches changes as it trains; recipes keep routers frozen "
                             "(AgileRL #630 and fms-hf-tuning #545 report broken serving after it)"))
    vision = [k for k in build.ranks if re.fullmatch(VISION_EXCLUDE, k)]
    if vision:
        found.append(Finding("warning", "vision-hit", f"{len(vision)} modules of the vision tower or projector get "
                             f"LoRA (e.g. {vision[0]}): suffix targets reach both towers; exclude them "
                             "(exclude_modules) unless you train on images"))
    embeds = [k for k in build.ranks if k == layout.head or isinstance(modules.get(k), nn.Embedding)]
    if embeds:
        found.append(Finding("warning", "head-or-embeddings", f"{', '.join(embeds)} get LoRA: the output head and "
                             "embeddings change every token's logits; most recipes leave them frozen"))
    adapters = sum(build.params.values())
    for name, size in sorted(build.saved.items()):
        found.append(Finding("warning", "modules-to-save", f"{name} is trained in full (modules_to_save): {size:,} "
                             f"parameters, {_share(size, build.trainable)} of what this config trains, "
                             f"{size / adapters:.0f}x the LoRA adapters" if adapters else
                             f"{name} is trained in full (modules_to_save): {size:,} parameters"))
    return found


def _type(key: str, layout: ModelLayout) -> str:
    """A target's role-true type; a wrapped parameter plop does not diagnose (a router's 2-D
    weight) goes by its module and parameter name."""
    return layout.role_map.get(key) or ".".join(key.split(".")[-2:])


def matrix(build: Build, layout: ModelLayout) -> dict[str, dict[int | None, bool]]:
    """Role type -> layer -> adapted, over every linear module, expert weight and wrapped parameter."""
    out: dict[str, dict[int | None, bool]] = {}
    for name in {*layout.role_map, *build.ranks}:
        cells = out.setdefault(_type(name, layout), {})
        layer = layer_index(name)
        cells[layer] = cells.get(layer, False) or name in build.ranks
    return out


def layer_findings(spec: StackConfig, cells: Mapping[str, Mapping[int | None, bool]]) -> list[Finding]:
    """Adapted types that some of their layers lack (layers_to_transform, mlx-lm num_layers)."""
    left: dict[tuple[int, ...], list[str]] = {}
    for t, layers in cells.items():
        if any(layers.values()) and not all(layers.values()):
            missing = tuple(sorted(k for k, v in layers.items() if not v and k is not None))
            if missing:
                left.setdefault(missing, []).append(t)
    why = {"mlx-lm": f" (mlx-lm num_layers: {spec.rules.get('num_layers')} adapts only the last blocks)"}.get(
        spec.stack, " (layers_to_transform)" if spec.placement.layers_to_transform is not None else "")
    return [Finding("warning", "layers-left-out", f"{', '.join(types)}: layers {_layers_text(list(missing))} get no "
                    f"adapter{why}") for missing, types in left.items()]


def engine_findings(spec: StackConfig, build: Build, cells: Mapping[str, Mapping[int | None, bool]]) -> list[Finding]:
    """Only what the engines' own code shows failing (sources in :mod:`plop.stacks.lint`)."""
    found = []
    if spec.settings.use_dora:
        found.append(Finding("warning", "vllm-dora", VLLM_DORA))
    if spec.stack != "unsloth":
        return found
    if spec.settings.dropout or spec.bias != "none" or spec.settings.use_dora:
        found.append(Finding("warning", "unsloth-slow-path", "unsloth's fused kernels need lora_dropout=0, bias "
                             f"'none' and no DoRA (got dropout={spec.settings.dropout}, bias={spec.bias!r}, "
                             f"dora={spec.settings.use_dora}): every layer runs on the slower PEFT path"))
    adapted = {t for t, layers in cells.items() if any(layers.values())}
    for fused, members in UNSLOTH_FUSED.items():
        have = [m for m in members if m in adapted]
        if have and len(have) < len(members) and all(m in cells for m in members):
            found.append(Finding("warning", "unsloth-slow-path", f"unsloth's fused {fused} kernel needs LoRA on all of "
                                 f"{', '.join(members)}, not only {', '.join(have)}: those layers run on the slower path"))
    return found


def conversion_note(build: Build) -> list[Finding]:
    """What PEFT's transformers-5 MoE conversion did to the targets (peft_rules explains it)."""
    before = set(getattr(build.lora_config, "target_parameters", None) or ())
    after = set(getattr(build.converted, "target_parameters", None) or ())
    if build.refused or after <= before:
        return []
    moved = sorted(set(build.lora_config.target_modules or ()) - set(build.converted.target_modules or ())) \
        if not isinstance(build.lora_config.target_modules, str) else [build.lora_config.target_modules]
    return [Finding("info", "peft-conversion", f"PEFT rewrote {', '.join(moved)} into target_parameters "
                    f"{sorted(after - before)} (its transformers-5 MoE conversion; a fused pair trains at twice the rank)")]


def findings(spec: StackConfig, build: Build, layout: ModelLayout, model: nn.Module, block_weights: int) -> list[Finding]:
    """Every finding, errors first."""
    cells = matrix(build, layout)
    found = misses(spec, build, layout)
    if not build.refused:
        found += expert_findings(build, layout, block_weights) + placement_findings(model, build, layout)
        found += layer_findings(spec, cells) + engine_findings(spec, build, cells)
    found += [Finding("info", "stack-rule", note) for note in spec.notes] + conversion_note(build)
    return sorted(found, key=lambda f: SEVERITIES.index(f.severity))
