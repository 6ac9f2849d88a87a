"""The diagnosis ``Report``: one dataclass, a versioned JSON schema, and exports.

A report is plain data: it can be saved, loaded on a machine without the model, rendered again
(:mod:`plop.reporter`), turned into a pandas DataFrame or a ``peft.LoraConfig``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from . import __version__
from .ranker import ModuleRecord, Recommendation, TypeRanking

SCHEMA_VERSION = 1
SCHEMA_ID = "plop.report"

_num = {"type": "number"}
_int = {"type": "integer"}
_str = {"type": "string"}
_opt_int = {"type": ["integer", "null"]}


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
        "data": _obj({"source": _str, "samples": _int, "tokens": _int}),
        "settings": {"type": "object"},
        "modules": {
            "type": "array",
            "minItems": 1,
            "items": _obj(
                {
                    "name": _str,
                    "type": _str,
                    "layer": _opt_int,
                    "d_out": _int,
                    "d_in": _int,
                    "nfn": _num,
                    "nfn_std": _num,
                    "tokens": _int,
                    "calls": _int,
                    "baseline": _num,
                    "input_norm_mean": _num,
                    "input_norm_max": _num,
                    "output_norm_mean": _num,
                }
            ),
        },
        "types": {
            "type": "array",
            "minItems": 1,
            "items": _obj(
                {"type": _str, "rank": _int, "nfn_mean": _num, "nfn_std": _num, "nfn_min": _num, "nfn_max": _num,
                 "n_modules": _int, "lora_params_per_rank": _int},
                {"selection_probability": {"type": ["number", "null"]}},
            ),
        },
        "recommendation": _obj(
            {
                "strategy": {"enum": ["top_k", "budget", "per_layer"]},
                "types": {"type": "array", "items": _str},
                "target_modules": {"anyOf": [{"type": "array", "items": _str}, _str]},
                "modules": {"type": "array", "items": _str},
                "rank": _int,
                "trainable_params": _int,
                "size_mb": _num,
            }
        ),
        "costs": {"type": "object"},
        "stability": {"type": "object"},
    }
)


class ReportError(ValueError):
    """A report file that cannot be read: the message says which field and why."""


def _build(cls, values: dict[str, Any]):
    """``cls(**values)`` without the keys ``cls`` does not know (fields a later plop may add)."""
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class Report:
    """Everything a diagnosis found, and what it recommends.

    ``modules`` holds one :class:`~plop.ranker.ModuleRecord` per linear module; ``types`` the
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
        """Write atomically: a failed write never leaves a partial file or clobbers a good one."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = self.to_json()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text + "\n")
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the report private
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

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
        error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(REPORT_SCHEMA).iter_errors(raw))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "top level"
            raise ReportError(f"{source}: not a valid plop report at {where}: {error.message}")
        fields = dict(raw)
        fields["modules"] = [_build(ModuleRecord, m) for m in raw["modules"]]
        fields["types"] = [_build(TypeRanking, t) for t in raw["types"]]
        fields["recommendation"] = _build(Recommendation, raw["recommendation"])
        return _build(cls, fields)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Report:
        """Read and validate a saved report; errors name the file, the field and the problem."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ReportError(f"{path}: no such report file") from None
        except OSError as e:
            raise ReportError(f"{path}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError:
            raise ReportError(f"{path}: not JSON (not UTF-8 text; a binary file?)") from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}: not JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        return cls.from_dict(raw, source=str(path))

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

    def to_peft_config(self, r: int | None = None, lora_alpha: int | None = None, **kwargs):
        """A ``peft.LoraConfig`` on the recommended ``target_modules``.

        ``r`` defaults to the rank the report was costed at, ``lora_alpha`` to ``2 * r``;
        ``kwargs`` go to ``LoraConfig`` (``lora_dropout``, ``use_dora``, ``task_type``, ...).
        """
        from peft import LoraConfig

        r = r or self.recommendation.rank
        kwargs.setdefault("task_type", self.task_type)
        return LoraConfig(r=r, lora_alpha=lora_alpha or 2 * r, target_modules=self.recommendation.target_modules,
                          **kwargs)

    @property
    def task_type(self) -> str | None:
        """PEFT's task type, read off the architecture name (``...ForCausalLM`` -> CAUSAL_LM)."""
        arch = self.model.get("architecture", "")
        if arch.endswith("LMHeadModel") and not arch.endswith("WithLMHeadModel"):  # GPT2LMHeadModel & co.
            return "CAUSAL_LM"
        for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                             ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
                             ("ForConditionalGeneration", "SEQ_2_SEQ_LM")):
            if arch.endswith(suffix):
                return task
        return None

    @property
    def module_types(self) -> list[str]:
        return [t.type for t in self.types]

    def __rich_console__(self, console, options):
        from .reporter import render

        yield render(self)

    def plot(self, path: str | os.PathLike | None = None):
        """Heatmap of NFN by layer x type and the per-type ranking (matplotlib figure)."""
        from .reporter import plot_report

        return plot_report(self, path)
