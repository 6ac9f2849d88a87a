"""Reading a stack's config file: :class:`StackConfig`, what every stack's ``read`` returns, and
the value parsers they share (torch-free, untrusted input).

Configs are read like reports: under a size cap (:func:`plop.utils.fsio.read_text_capped`, checked
on the open file before a byte is read), YAML with the safe loader and JSON with the standard
parser, both under a nesting limit and YAML under a cap on its expanded aliases
(:mod:`plop.utils.untrusted`), and a Python file (unsloth) parsed with :mod:`ast` and never run.
Regexes go through :func:`check_regexes` where they are used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import names as split_names
from ..errors import ConfigError
from ..placement import LoraSettings, Placement, lora_kwargs
from ..utils.fsio import read_text_capped
from ..utils.untrusted import check_regex, parse_json, parse_yaml

MAX_CONFIG_BYTES = 4 * 1024 * 1024  # training configs are kilobytes; this leaves room for long regex lists


@dataclass
class StackConfig:
    """A LoRA config as one stack reads it: the :class:`Placement` and :class:`LoraSettings` it
    hands to PEFT, what else it passes (``modules_to_save``, ``bias``), and the stack's own rules
    that need the model to be resolved (``expand``: ``axolotl-linear``, ``llama-factory-all``,
    ``torchtune``, ``mlx-lm``; their switches in ``rules``)."""

    stack: str  # which stack's keys these are ("inline": the command line)
    source: str
    placement: Placement
    settings: LoraSettings
    modules_to_save: list[str] | None = None
    bias: str = "none"
    base_model: str | None = None
    expand: str | None = None
    rules: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the stack did to the keys on the way to PEFT

    def lora_kwargs(self) -> dict[str, Any]:
        """The ``LoraConfig`` arguments, as the stack asks for them, before any rule that needs the model."""
        return lora_kwargs(self.placement, self.settings, modules_to_save=self.modules_to_save, bias=self.bias)


def check_regexes(kwargs: dict) -> None:
    """Every regex PEFT will run on module names, through the ReDoS guard first."""
    for key in ("target_modules", "exclude_modules"):
        if isinstance(kwargs.get(key), str) and kwargs[key] != "all-linear":
            check_regex(kwargs[key])
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern in kwargs.get(key) or {}:
            check_regex(pattern)


def load_text(path: Path) -> Any:
    """A config file's content: JSON, a Python file's text (unsloth), else YAML."""
    text = read_text_capped(path, MAX_CONFIG_BYTES)
    if path.suffix == ".json":
        return parse_json(text, str(path))
    if path.suffix == ".py":
        return text
    return parse_yaml(text, str(path))


def names(value: Any, key: str) -> list[str] | None:
    """A list of names from a list, or from a comma-separated string (LLaMA-Factory, CLIs)."""
    if value is None:
        return None
    if isinstance(value, str):
        return split_names(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, (list, tuple)):
        odd = next(v for v in value if not isinstance(v, str))
        raise ConfigError(f"{key} must be a list of module names, not a list holding {type(odd).__name__}")
    raise ConfigError(f"{key} must be a list of module names, not {type(value).__name__}")


def targets(value: Any, key: str) -> list[str] | str | None:
    """PEFT's ``target_modules``: a list of suffixes, or one string that PEFT full-matches as a regex."""
    if value is None or isinstance(value, str):
        return value
    return names(value, key)


def number(data: Mapping, key: str, default: Any, kind: type = int) -> Any:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ConfigError(f"{key} must be a{'n integer' if kind is int else ' number'}, not {value!r}")
    return kind(value)


def pattern(data: Mapping, key: str) -> dict:
    """A ``rank_pattern``/``alpha_pattern``: {} when absent (PEFT's default: no key of its own)."""
    value = data.get(key) or {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{key} must map module-name patterns to numbers")
    return {k: number(value, k, None, float if "alpha" in key else int) for k in value}


def layers(value: Any, key: str) -> list[int] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, int) else value
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{key} must be a layer index or a list of them")
    return values
