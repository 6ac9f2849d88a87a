"""``plop.audit.check``: one config against one model's structure, without its weights.

Everything that can refuse the input (the config, its regexes, the model's config.json and its size)
runs before torch is imported, so a hostile input costs a fraction of a second and tens of MB; the
modules that build and wrap the model (:mod:`.resolve`, :mod:`.findings`) are imported after.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import default_alpha, targets
from ..errors import ConfigError
from ..placement import LoraSettings, Placement
from ..stacks import StackConfig, read_config
from ..stacks.reading import check_regexes, names
from .meta import meta_model

if TYPE_CHECKING:
    from .resolve import Build
    from .result import CheckResult, RoleRow


def inline_spec(target_modules: list[str] | str | None, target_parameters: list[str] | str | None = None,
                rank_pattern: list[str] | str | None = None, rank: int = 16) -> StackConfig:
    """``--target-modules a,b`` (text as :func:`plop.config.targets` reads it), ``--target-parameters``,
    ``--rank-pattern key=r,key=r``: as typed, or as the command line parsed them; ``rank`` and the
    default alpha as ``plop train`` would use them."""
    wanted = targets(target_modules) if isinstance(target_modules, str) else target_modules
    pattern = {}
    for item in names(rank_pattern, "--rank-pattern") or []:
        key, sep, value = item.rpartition("=")
        if not sep or not key or not value.isdigit():
            raise ConfigError(f"--rank-pattern takes KEY=RANK pairs, not {item!r}")
        pattern[key] = int(value)
    if wanted is None and target_parameters is None:
        raise ConfigError("give a CONFIG file, or --target-modules / --target-parameters")
    placement = Placement(target_modules=wanted, target_parameters=names(target_parameters, "--target-parameters"),
                          rank_pattern=pattern, alpha_pattern={})
    return StackConfig("inline", "command line", placement, LoraSettings(rank, default_alpha(rank), 0.0))


def base_model_path(spec: StackConfig, model: str | Path | None) -> str | Path:
    """MODEL, else the base model the config names when that is a local folder or a ``.gguf``."""
    if model is not None:
        return model
    base = spec.base_model
    if base and (Path(base).expanduser().is_dir() or str(base).endswith(".gguf")):
        return base
    named = f" it names {base!r}, which is not a local model folder or .gguf file" if base else " it names none"
    raise ConfigError(f"give MODEL (a folder with config.json, a config.json or a .gguf):{named}")


def _roles(build: Build, layout, cells) -> list[RoleRow]:
    from .findings import _type
    from .result import RoleRow

    rows = []
    for t, layers in cells.items():
        names = [n for n in {*layout.role_map, *build.ranks} if _type(n, layout) == t]
        adapted = [n for n in names if n in build.ranks]
        rows.append(RoleRow(t, len(adapted), len(names), sum(build.params.get(n, 0) for n in adapted),
                            sorted({build.ranks[n] for n in adapted}), dict(layers)))
    return sorted(rows, key=lambda r: (-r.trainable, r.type))


def nfn_budget(roles: list[RoleRow], report, rank: int) -> dict[str, Any]:
    """Where the config's LoRA parameters go by NFN, beside plop's choice at the same budget: the
    report's types in ascending NFN, greedily, while their cost at ``rank`` fits."""
    from ..ranking.ranker import select_budget

    ranked = sorted(report.types, key=lambda t: t.position)
    spent = {r.type: r.trainable for r in roles if r.trainable}
    budget = sum(spent.values())
    low = {t.type for t in ranked[:math.ceil(len(ranked) / 2)]}
    recommended = set(report.recommendation.types)
    means = {t.type: t.nfn_mean for t in ranked}
    chosen = select_budget(means, {t.type: t.lora_params_per_rank * rank for t in ranked}, budget)
    share = (lambda types: round(sum(p for t, p in spent.items() if t in types) / budget, 4) if budget else 0.0)
    return {"budget": budget, "share_on_low_nfn_half": share(low), "share_on_recommended": share(recommended),
            "recommended_types": sorted(recommended), "same_budget_types": chosen,
            "same_budget_params": sum(t.lora_params_per_rank * rank for t in ranked if t.type in chosen),
            "config_types": sorted(spent, key=lambda t: means.get(t, math.inf))}


def check(config: str | Path | StackConfig, model: str | Path | None = None, *, report: Any = None,
          flavour: str | None = None) -> CheckResult:
    """Audit ``config`` (a file, a PEFT adapter folder or a :class:`plop.stacks.StackConfig`) against ``model``
    (a model folder, its ``config.json`` or a ``.gguf``; default: the base model the config names).
    ``report``: a :class:`plop.Report` (or its path) of this model, to weigh the placement by NFN."""
    start = time.perf_counter()
    spec = config if isinstance(config, StackConfig) else read_config(config, flavour)
    if spec.expand == "torchtune" and model is not None:
        spec = replace(spec, notes=[*spec.notes, "MODEL is not used: torchtune builds the model from "
                                    f"model._component_ ({spec.rules.get('component')}); its checkpointer only loads the weights"])
    # every regex PEFT will run comes from the config (the stack rules add lists of names), so the
    # ReDoS guard runs here, before seconds of building
    check_regexes(spec.lora_kwargs())
    if isinstance(report, (str, Path)):
        from ..ranking.report import Report

        report = Report.load(report)
    built, info = _model(spec, model)
    # torch and PEFT from here on, once the input is known to be buildable
    from ..model.coverage import block_units
    from ..model.loading import model_layout
    from ..ranking.placements import check_report_matches
    from .findings import findings, matrix
    from .resolve import lora_kwargs, native, wrap
    from .result import CheckResult

    layout = model_layout(built)
    if report is not None:
        check_report_matches(report, layout)
    units = {unit: numel for unit, (numel, _) in block_units(built, layout.params).items()}  # before PEFT renames
    kwargs = lora_kwargs(spec, built)
    build = native(spec, built) if spec.expand == "mlx-lm" else wrap(built, kwargs)
    block_weights = sum(units.values())
    adapted = sum(n for unit, n in units.items() if unit in build.ranks) / block_weights if block_weights else 0.0
    cells = matrix(build, layout)
    roles = _roles(build, layout, cells)
    result = CheckResult(
        spec.stack, spec.source, info, _shown(kwargs), build.trainable, sum(build.params.values()),
        sum(build.saved.values()), roles, findings(spec, build, layout, built, block_weights),
        round(adapted, 4), modules=sorted(build.ranks), stack_modules=build.native)
    if report is not None and not build.refused:
        result.by_nfn = nfn_budget(roles, report, spec.settings.r)
    result.seconds = time.perf_counter() - start
    return result


def _model(spec: StackConfig, model: str | Path | None) -> tuple[Any, dict[str, Any]]:
    """The meta model ``spec`` trains and its facts: a torchtune recipe's from its builder (MODEL,
    a Hugging Face config, is then only where the checkpointer reads weights from), else MODEL's."""
    if spec.expand == "torchtune":
        from .builder import builder_model

        built, info = builder_model(spec)
        return built, {**info, "encoder_decoder": False, "dtype": None, "quantization": None}
    path = base_model_path(spec, model)
    built = meta_model(path)  # refuses a hostile config.json before torch is imported
    from ..model.loading import model_info

    return built, {**model_info(built, str(path)), "dtype": None}


def _shown(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The LoraConfig arguments as JSON values, the empty ones left out."""
    return {k: sorted(v) if isinstance(v, set) else v for k, v in kwargs.items() if v not in (None, {}, [], False)}
