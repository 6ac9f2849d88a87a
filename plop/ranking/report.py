"""The diagnosis ``Report``: one dataclass, a versioned JSON schema, and exports.

A report is plain data: it can be saved, loaded on a machine without the model, rendered again
(:mod:`plop.ranking.render`), turned into a pandas DataFrame or a ``peft.LoraConfig``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from ..config import STRATEGIES, recorded_settings
from ..errors import FileError, ReportError, UnsafeRegexError
from ..placement import LoraSettings, Placement, lora_config
from ..utils.fsio import atomic_write, read_text_capped
from ..utils.untrusted import check_json_depth, check_regex, plain_safe
from ..version import __version__

# 2: modules' and data's 'tokens' counts are 'token_count', types' 'rank' is 'position'; 3: the
# recommendation is a Placement (its 'name', PEFT's exclusion keys), an allocation's alpha_pattern
# is derived from the rank_pattern where the LoRA settings are known rather than stored
SCHEMA_VERSION = 3
SCHEMA_ID = "plop.report"


@dataclass
class ModuleRecord:
    """One linear module's diagnosis."""

    name: str
    type: str
    layer: int | None
    d_out: int
    d_in: int
    nfn: float
    nfn_std: float
    token_count: int  # scored tokens seen (the config's 'tokens' is which tokens are scored)
    calls: int
    baseline: float
    input_norm_mean: float
    input_norm_max: float
    output_norm_mean: float
    kappa: float | None = None  # data-free scores, when asked for (plop.measure.weight_scores)
    snr: float | None = None
    experts: int | None = None  # a 3-D expert weight (E, d_out, d_in); its NFN is the routed tokens' mean
    expert_nfn: list[float | None] | None = None  # per expert; None for an expert no token reached
    grad_sign: float | None = None  # sign consistency of its LoRA-B gradients, when asked for (plop.measure.grad_sign)

    @property
    def lora_params_per_rank(self) -> int:
        """LoRA adds ``r * (d_in + d_out)`` parameters (A is r x d_in, B is d_out x r); PEFT's
        ``target_parameters`` give each of a 3-D weight's experts its own pair."""
        return (self.experts or 1) * (self.d_in + self.d_out)


@dataclass
class TypeRanking:
    """One module type, aggregated over layers."""

    type: str
    position: int  # 1 = the signal's first choice, the lowest mean NFN by default (a LoRA rank is 'rank' elsewhere)
    nfn_mean: float
    nfn_std: float
    nfn_min: float
    nfn_max: float
    n_modules: int
    lora_params_per_rank: int
    selection_probability: float | None = None


@dataclass(kw_only=True)
class Recommendation(Placement):
    """A diagnosis's placement (``name`` "recommended"), with what it costs and how it was chosen:
    the strategy, the chosen module names, the rank it was costed at, and its stability. An
    allocation's ``rank_pattern`` gives each chosen type its own rank (its alpha keeps alpha / rank
    as the settings', see :func:`plop.placement.lora_kwargs`)."""

    strategy: str
    modules: list[str]
    rank: int
    trainable_params: int
    size_mb: float
    name: str = "recommended"
    stable: bool | None = None
    agreement: float | None = None
    samples_to_stable: int | None = None
    allocation: dict[str, Any] | None = None  # the allocate strategy's rule and budget
    excluded: dict[str, str] | None = None  # types PEFT refuses on this model -> why; never recommended


_num = {"type": "number", "minimum": 0}  # norms, NFNs and sizes: never negative (nor NaN: see _non_finite)
_int = {"type": "integer"}
_pos = {"type": "integer", "minimum": 1}
_count = {"type": "integer", "minimum": 0}
_str = {"type": "string"}
_opt_int = {"type": ["integer", "null"]}
_opt_budget = {"type": ["integer", "null"], "minimum": 1}
_opt_ranks = {"type": ["object", "null"], "additionalProperties": {"type": "integer", "minimum": 1}}
_opt_strs = {"type": ["array", "null"], "items": _str}


def _obj(required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict:
    return {
        "type": "object",
        "required": sorted(required),
        "properties": {**required, **(optional or {})},
    }


REPORT_SCHEMA = _obj(
    {
        "schema": {"const": SCHEMA_ID},
        "schema_version": _int,
        "plop_version": _str,
        "model": _obj({"id": _str, "architecture": _str}),
        "data": _obj({"source": _str, "samples": _count, "token_count": _count}),
        # the strategy is one object; before it, its kind stood beside top_k, budget and allocate_power
        "settings": {"type": "object", "properties": {
            "rank": _pos, "top_k": _pos, "budget": _opt_budget,
            "strategy": {"anyOf": [{"enum": list(STRATEGIES)}, _obj(
                {"kind": {"enum": list(STRATEGIES)}},
                {"top_k": _pos, "budget": _opt_budget, "power": {"type": "number", "exclusiveMinimum": 0}})]}}},
        "modules": {
            "type": "array",
            "minItems": 1,
            "items": _obj(
                {
                    "name": _str,
                    "type": _str,
                    "layer": _opt_int,
                    "d_out": _pos,
                    "d_in": _pos,
                    "nfn": _num,
                    "nfn_std": _num,
                    "token_count": _count,
                    "calls": _count,
                    "baseline": _num,
                    "input_norm_mean": _num,
                    "input_norm_max": _num,
                    "output_norm_mean": _num,
                },
                {"experts": _opt_int, "expert_nfn": {"type": ["array", "null"], "items": {"type": ["number", "null"]}},
                 "grad_sign": {"type": ["number", "null"], "minimum": 0, "maximum": 1}},
            ),
        },
        "types": {
            "type": "array",
            "minItems": 1,
            "items": _obj(
                {"type": _str, "position": _pos, "nfn_mean": _num, "nfn_std": _num, "nfn_min": _num, "nfn_max": _num,
                 "n_modules": _pos, "lora_params_per_rank": _pos},
                {"selection_probability": {"type": ["number", "null"]}},
            ),
        },
        "recommendation": _obj(
            {
                "strategy": {"enum": list(STRATEGIES)},
                "types": {"type": "array", "items": _str},
                "target_modules": {"anyOf": [{"type": "array", "items": _str}, _str]},
                "modules": {"type": "array", "items": _str},
                "rank": _pos,
                "trainable_params": _count,
                "size_mb": _num,
            },
            {"name": _str, "rank_pattern": _opt_ranks, "alpha_pattern": {"type": ["object", "null"]},
             "target_parameters": _opt_strs, "excluded": {"type": ["object", "null"], "additionalProperties": _str},
             "exclude_modules": {"anyOf": [_opt_strs, _str]}, "layers_to_transform": {"type": ["array", "null"]},
             "layers_pattern": {"anyOf": [_opt_strs, _str]}},
        ),
        "costs": {"type": "object"},
        "stability": {"type": "object"},
    },
    {"coverage": _obj({"share": _num, "undiagnosed": {"type": "array"}})},
)


MAX_REPORT_BYTES = 64 << 20  # a report of a 1,000-layer model is a few MB


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a finite number")


def _non_finite(value: Any, where: str = "") -> str | None:
    """The path of the first NaN or infinity in ``value`` (a report built in Python, not parsed)."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "top level"
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        found = _non_finite(child, f"{where}/{key}" if where else str(key))
        if found is not None:
            return found
    return None


def _renamed(value: Any, old: str, new: str) -> Any:
    """``value`` with key ``old`` named ``new``, when it is a dict holding it (else as it is)."""
    if not isinstance(value, dict) or old not in value:
        return value
    return {new if k == old else k: v for k, v in value.items()}


def _from_version_1(raw: dict[str, Any]) -> dict[str, Any]:
    """A version-1 report in version 2's names: the token counts were ``tokens`` (the word the
    config uses for which tokens are scored) and a type's place in the ranking was ``rank``. Only
    well-formed parts are renamed; the schema then judges the result."""
    out = {**raw, "schema_version": 2, "data": _renamed(raw.get("data"), "tokens", "token_count")}
    for key, old, new in (("modules", "tokens", "token_count"), ("types", "rank", "position")):
        if isinstance(raw.get(key), list):
            out[key] = [_renamed(item, old, new) for item in raw[key]]
    return out


def _from_version_2(raw: dict[str, Any]) -> dict[str, Any]:
    """A version-2 report in version 3's terms: an allocation stored ``alpha_pattern`` as 2 x each
    type's rank, which is what version 3 derives at the default alpha, and derives anew when the
    rank or alpha is overridden (so a stored one would pin the default). Well-formed parts only."""
    out = {**raw, "schema_version": SCHEMA_VERSION}
    if isinstance(raw.get("recommendation"), dict):
        out["recommendation"] = {k: v for k, v in raw["recommendation"].items() if k != "alpha_pattern"}
    return out


def _build(cls, values: dict[str, Any]):
    """``cls(**values)`` without the keys ``cls`` does not know (fields a later plop may add)."""
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class Report:
    """Everything a diagnosis found, and what it recommends.

    ``modules`` holds one :class:`ModuleRecord` per linear module; ``types`` the
    per-type ranking (ascending mean NFN); ``recommendation`` the chosen ``target_modules``.
    """

    model: dict[str, Any]
    data: dict[str, Any]
    settings: dict[str, Any]
    modules: list[ModuleRecord]
    types: list[TypeRanking]
    recommendation: Recommendation
    costs: dict[str, dict]
    stability: dict[str, Any]
    data_free: dict[str, list[str]] | None = None  # what KappaTune and Spectrum would pick, beside NFN
    coverage: dict[str, Any] = field(default_factory=dict)  # see plop.model.coverage; empty in older reports
    plop_version: str = __version__
    schema: str = SCHEMA_ID
    schema_version: int = SCHEMA_VERSION
    created: str = field(default="")

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (:func:`plop.utils.fsio.atomic_write`): a failed write never leaves a
        partial file or clobbers a good one, and a symlink at ``path`` is refused."""
        return atomic_write(path, self.to_json() + "\n")

    @classmethod
    def from_dict(cls, raw: Any, source: str = "report") -> Report:
        if not isinstance(raw, dict):
            raise ReportError(f"{source}: a report is a JSON object, got {type(raw).__name__}")
        if raw.get("schema") == SCHEMA_ID and isinstance(raw.get("schema_version"), int):
            if raw["schema_version"] > SCHEMA_VERSION:
                raise ReportError(
                    f"{source}: schema version {raw['schema_version']} is newer than this plop "
                    f"({__version__}) reads (up to {SCHEMA_VERSION}); upgrade plop"
                )
        if raw.get("schema_version") == 1:
            raw = _from_version_1(raw)
        if raw.get("schema_version") == 2:
            raw = _from_version_2(raw)
        error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(REPORT_SCHEMA).iter_errors(raw))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "top level"
            raise ReportError(f"{source}: not a valid plop report at {where}: {plain_safe(error.message)}")
        where = _non_finite(raw)
        if where is not None:
            raise ReportError(f"{source}: not a valid plop report at {where}: not a finite number")
        target = raw["recommendation"]["target_modules"]
        if isinstance(target, str):  # PEFT full-matches it against every module name: it must be safe to run
            try:
                check_regex(target)
            except UnsafeRegexError as e:
                raise ReportError(f"{source}: recommendation/target_modules: {e}") from None
        fields = {**raw, "settings": recorded_settings(raw["settings"])}
        fields["modules"] = [_build(ModuleRecord, m) for m in raw["modules"]]
        fields["types"] = [_build(TypeRanking, t) for t in raw["types"]]
        fields["recommendation"] = _build(Recommendation, raw["recommendation"])
        return _build(cls, fields)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Report:
        """Read and validate a saved report (untrusted input: at most :data:`MAX_REPORT_BYTES`, a
        regular file); errors name the file, the field and the problem."""
        try:
            text = read_text_capped(path, MAX_REPORT_BYTES)
        except FileError as e:
            raise ReportError(str(e)) from None
        check_json_depth(text, plain_safe(str(path)), ReportError)  # json.loads recurses once a level
        try:
            raw = json.loads(text, parse_constant=_refuse_constant)
        except json.JSONDecodeError as e:
            where = f"line {e.lineno}, column {e.colno}"
            raise ReportError(f"{plain_safe(str(path))}: not JSON ({where}: {e.msg})") from None
        except ValueError as e:  # NaN or Infinity, which JSON itself does not have
            raise ReportError(f"{plain_safe(str(path))}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=plain_safe(str(path)))

    # -- exports -----------------------------------------------------------------------------
    def to_dataframe(self, level: str = "module"):
        """A pandas DataFrame of the modules (``level="module"``) or the type ranking (``"type"``),
        with a ``recommended`` column."""
        import pandas as pd

        if level == "module":
            chosen = set(self.recommendation.modules)
            rows = [{**dataclasses.asdict(m), "recommended": m.name in chosen} for m in self.modules]
        elif level == "type":
            chosen = set(self.recommendation.types)
            rows = [{**dataclasses.asdict(t), "recommended": t.type in chosen} for t in self.types]
        else:
            raise ValueError(f"level must be 'module' or 'type', not {level!r}")
        return pd.DataFrame(rows)

    def to_peft_config(self, r: int | None = None, lora_alpha: float | None = None, **kwargs):
        """A ``peft.LoraConfig`` on the recommendation (:func:`plop.placement.lora_config`): ``r``
        defaults to the rank the report was costed at, ``lora_alpha`` to the default alpha,
        ``lora_dropout`` to PEFT's 0; ``kwargs`` go to ``LoraConfig`` (``use_dora``, ``task_type``...)."""
        settings = LoraSettings(r or self.recommendation.rank, lora_alpha, dropout=kwargs.pop("lora_dropout", 0.0),
                                use_dora=kwargs.pop("use_dora", False), use_rslora=kwargs.pop("use_rslora", False))
        return lora_config(self.recommendation, settings, **{"task_type": self.task_type, **kwargs})

    @property
    def task_type(self) -> str | None:
        """PEFT's task type for this report's model (:func:`plop.ranking.peft_config.task_type`)."""
        from .peft_config import task_type

        return task_type(self.model)

    @property
    def module_types(self) -> list[str]:
        return [t.type for t in self.types]

    def __rich_console__(self, console, options):
        from .render import render_report

        yield render_report(self)

    def _repr_html_(self) -> str:
        """Jupyter's display: the ``plop show --html`` page's tables and figure, inline."""
        from .html_report import render_fragment

        return render_fragment(self)

    def plot(self, path: str | os.PathLike | None = None):
        """Heatmap of NFN by layer x type and the per-type ranking (matplotlib figure)."""
        from .render import plot_report

        return plot_report(self, path)
