"""``ExportResult`` and the text around it: YAML rendering and ``merge_into`` for --merge."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import yaml

from ..errors import ConfigError, first_line
from .lint import lint
from .target import Target


@dataclass
class ExportResult:
    """One stack's snippet. ``settings`` holds only the keys this export owns, nested as in the
    file; ``exact`` is False when the stack had to take a superset (or drop part) of the placement."""

    format: str
    text: str
    filename: str
    settings: dict[str, Any]
    warnings: list[str]
    exact: bool


def _header(t: Target, fmt: str, exact: bool, warnings: list[str], comment: str) -> str:
    rec = t.report.recommendation
    lines = [f"plop {fmt} export for {t.report.model.get('id')}: {rec.strategy} placement on "
             f"{len(t.modules)} modules ({', '.join(t.types)})",
             "exact: the stack trains exactly the recommended modules" if exact
             else "NOT exact: this is the closest superset the stack can express"]
    lines += [f"warning: {w}" for w in warnings] + ([comment] if comment else [])
    return "".join(f"# {line}\n" for line in lines)


def finish(t: Target, fmt: str, settings: dict[str, Any], filename: str, warnings: list[str], exact: bool,
           body: str | None = None, comment: str = "") -> ExportResult:
    """Add the cross-stack lint, and render ``settings`` as commented YAML unless ``body`` is given."""
    warnings = warnings + lint(t, fmt)
    if body is None:
        body = _header(t, fmt, exact, warnings, comment) + yaml.safe_dump(settings, sort_keys=False, width=1000)
    return ExportResult(fmt, body, filename, settings, warnings, exact)


def _deep_update(base: dict, new: dict) -> dict:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def merge_into(existing: str, result: ExportResult) -> str:
    """``existing`` config text (YAML, or JSON for ``peft``) with ``result``'s keys written in;
    every other key and its value is kept, in order (YAML comments are not kept)."""
    if result.format == "unsloth":
        raise ConfigError("unsloth exports are Python code; paste the snippet instead of merging")
    try:
        config = yaml.safe_load(existing) or {}  # JSON is YAML, so adapter_config.json loads the same way
    except yaml.YAMLError as e:
        raise ConfigError(f"the config to merge into is not YAML/JSON: {first_line(e)}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"cannot merge into a config whose top level is a {type(config).__name__}")
    merged = _deep_update(config, result.settings)
    if result.format == "peft":
        return json.dumps(merged, indent=2, sort_keys=True) + "\n"
    return yaml.safe_dump(merged, sort_keys=False, width=1000)
