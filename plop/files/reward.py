"""GRPO reward functions: ``MODULE:FUNCTION`` resolved to a callable, checked against TRL's signature
before any model loads, and checked again on what it returns.

TRL calls a reward as ``f(prompts=..., completions=..., completion_ids=..., trainer_state=...,
log_extra=..., log_metric=..., <each other data field>=...)`` and expects one float (or None) per
completion. A function that cannot take those keywords would fail only after the first batch of
generations; binding the call here says so in one line at once.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import ConfigError, PlopError

SIGNATURE = "f(completions, **kwargs) -> list[float]"
# what TRL passes besides the data's fields (trl/trainer/grpo_trainer.py, _calculate_rewards)
TRL_KEYWORDS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")
DATA_FIELDS = ("response",)  # the rows' fields besides the prompt, which TRL passes on as keyword lists


class RewardError(PlopError):
    """A reward function that cannot be found, cannot take TRL's arguments, or returns no rewards."""


def load_reward(spec: str | Callable, fields: Sequence[str] = DATA_FIELDS) -> Callable[..., list[float]]:
    """The reward function ``spec`` names (``MODULE:FUNCTION``) or is, once it is known to accept
    TRL's keywords and the data's ``fields``; wrapped so that a wrong return value is one line."""
    function = _resolve(spec) if isinstance(spec, str) else spec
    if not callable(function):
        raise RewardError(f"reward {spec!r} is not a function")
    name = getattr(function, "__name__", type(function).__name__)
    try:
        inspect.signature(function).bind(**{key: None for key in (*TRL_KEYWORDS, *fields)})
    except TypeError as error:
        raise RewardError(f"reward {name} does not take TRL's arguments ({error})",
                          f"define it as {SIGNATURE}") from None
    except ValueError:  # a builtin without a readable signature: trust it
        pass
    if inspect.iscoroutinefunction(function):  # TRL awaits these itself; a wrapper would hide that
        return function
    return _checked(function, name)


def _resolve(spec: str) -> Callable:
    module_name, sep, attribute = spec.rpartition(":")
    if not sep or not module_name or not attribute.isidentifier():
        raise ConfigError(f"reward must be MODULE:FUNCTION, got {spec!r}", "e.g. --reward rewards:exact_match")
    try:
        module = _import(module_name)
    except PlopError:
        raise
    except Exception as error:  # the user's module failed while importing: its own error, in one line
        raise RewardError(f"cannot import reward module {module_name!r}: {type(error).__name__}: {error}") from None
    if not hasattr(module, attribute):
        raise RewardError(f"reward module {module_name!r} has no {attribute!r}")
    return getattr(module, attribute)


def _import(name: str):
    """A ``.py`` file by its path, else a module importable from the current directory (as
    ``python -m`` would find it)."""
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise RewardError(f"reward file {name} does not exist")
        spec = importlib.util.spec_from_file_location(f"plop_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name and name.startswith(error.name):  # the module itself, not one it imports
            raise RewardError(f"no reward module {name!r}", "run from its directory, or give a .py path") from None
        raise


def _checked(function: Callable, name: str) -> Callable[..., list[float]]:
    @functools.wraps(function)  # TRL logs each reward under its __name__
    def reward(*args, completions, **kwargs) -> list[float]:
        values = function(*args, completions=completions, **kwargs)
        if not isinstance(values, (list, tuple)) or len(values) != len(completions) or not all(
                v is None or (isinstance(v, numbers.Real) and math.isfinite(v))
                for v in values):
            raise RewardError(f"reward {name} must return one finite number (or None) per completion, "
                              f"{len(completions)} here; it returned {_shape(values)}")
        return [None if v is None else float(v) for v in values]

    return reward


def _shape(values) -> str:
    if isinstance(values, (list, tuple)):
        return f"a {type(values).__name__} of {len(values)}: {str(values)[:60]}"
    return type(values).__name__
