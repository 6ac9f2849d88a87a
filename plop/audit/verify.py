"""``plop export`` reads back what it wrote, as ``plop check`` reads any config, and resolves it on
the report's own module names with PEFT's matcher: equal to the recommendation, or exactly what differs.

No model is built: a report holds every linear module and expert weight it diagnosed, which is
what the recommendation chooses from.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import first_line
from ..model.names import layer_index
from ..model.roles import peft_matches
from ..stacks import STACKS, mlx_lm, torchtune
from ..stacks.reading import check_regexes
from ..utils.untrusted import parse_yaml


def _parse(text: str, fmt: str) -> Any:
    if fmt == "peft":
        return json.loads(text)
    return text if fmt == "unsloth" else parse_yaml(text, f"the {fmt} export")


def _kwargs_on_names(spec, names: list[str]) -> dict:
    """The stack's rules that need the model, on names alone (plop's exports never write the ones
    that need module classes: lora_target_linear, lora_target all)."""
    kwargs = spec.lora_kwargs()
    if spec.expand == "torchtune":
        kwargs["target_modules"] = torchtune.hf_targets(spec)
    elif spec.expand == "mlx-lm":
        n = 1 + max((layer_index(x) for x in names if layer_index(x) is not None), default=-1)
        kwargs["layers_to_transform"] = list(mlx_lm.chosen_blocks(spec.rules.get("num_layers", n), n))
    return kwargs


def resolve_export(text: str, fmt: str, report) -> set[str] | None:
    """The report's modules and expert weights that the exported ``text`` reaches (None for spectrum)."""
    if STACKS[fmt].read is None:
        return None
    spec = STACKS[fmt].read(_parse(text, fmt), f"the {fmt} export")
    if spec.expand == "mlx-lm" and report.model.get("model_type") in mlx_lm.TREES:
        return mlx_lm.reached(spec, [(m.name, m.layer) for m in report.modules], report.model["model_type"])
    names = [m.name for m in report.modules if m.experts is None]
    params = [m.name for m in report.modules if m.experts is not None]
    kwargs = _kwargs_on_names(spec, names)
    check_regexes(kwargs)
    wanted = kwargs.get("target_parameters") or ()
    reached = {p for p in params if peft_matches(p, list(wanted))}
    if kwargs.get("target_modules"):
        layered = {k: kwargs[k] for k in ("layers_to_transform", "layers_pattern", "exclude_modules") if kwargs.get(k)}
        reached |= {n for n in names if peft_matches(n, kwargs["target_modules"], **layered)}
    return reached


def export_difference(text: str, fmt: str, report) -> str | None:
    """None when the export resolves to exactly the recommendation, else one line saying how it differs."""
    try:
        reached = resolve_export(text, fmt, report)
    except ValueError as e:
        return f"read back, the {fmt} export does not resolve: {first_line(e)}"
    if reached is None:
        return None
    planned = set(report.recommendation.modules)
    extra, missing = sorted(reached - planned), sorted(planned - reached)
    if not extra and not missing:
        return None
    parts = [f"{len(extra)} modules beyond the recommendation (e.g. {extra[0]})"] if extra else []
    parts += [f"misses {len(missing)} recommended (e.g. {missing[0]})"] if missing else []
    return f"read back, the {fmt} export reaches {' and '.join(parts)}"
