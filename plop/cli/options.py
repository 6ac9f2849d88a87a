"""The command line's options, generated from the config dataclasses' fields (:func:`plop.config.option`).

A field gives its flag (``--field-name``), type, default, choices and help; a command names the
configs it reads and gets their options grouped as the fields say. A field shared by several
configs of one command (``seed``, ``max_length``) is one flag feeding all of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from ..config import names

EXIT_USAGE = 2


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        # "(default: None)" says nothing: such options explain their absence in their own help
        silent = action.default is None or action.default is False
        if isinstance(action.default, tuple) and action.default:  # a list option's default, as it is typed
            return f"{action.help or ''} (default: {','.join(map(str, action.default))})"
        return (action.help or "") if silent else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Usage errors in plop's one-line form (argparse's default adds the whole usage block)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"plop: error: {message} (see '{self.prog} --help')\n")


def positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {number}")
    return number


def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return number


def escapes(value: str) -> str:
    r"""A template typed in a shell: ``\n`` means a newline."""
    return value.encode().decode("unicode_escape")


def numbers(kind: type):
    def parse(value: str) -> tuple:
        try:
            return tuple(kind(v) for v in names(value))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {'whole numbers' if kind is int else 'numbers'}, "
                                             f"got {value!r}") from None
    return parse


_PARSERS = {"positive": positive, "names": names, "escapes": escapes, "ints": numbers(int), "floats": numbers(float)}


class SwitchWithValue(argparse.Action):
    """A switch that may be given a value for another field: ``--allocate`` is the switch alone,
    ``--allocate BUDGET`` the switch and ``budget`` (the two are one choice on the command line)."""

    def __init__(self, option_strings: list[str], dest: str, into: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", **kwargs)
        self.into = into

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        setattr(namespace, self.dest, True)
        if value is not None:
            setattr(namespace, self.into, value)


def _base_type(annotation: Any) -> tuple[Any, tuple | None]:
    """``(python type, Literal choices)`` of a field's annotation, ``None`` stripped."""
    hint = annotation
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is Literal:
        return str, typing.get_args(hint)
    if typing.get_origin(hint) in (list, tuple):  # comma-separated: names, or whole numbers or numbers
        return {int: "ints", float: "floats"}.get(typing.get_args(hint)[0], "names"), None
    return hint, None


def _argument(f: dataclasses.Field, hint: Any, default: Any) -> tuple[list[str], dict[str, Any]]:
    """The ``add_argument`` call for one field."""
    meta = f.metadata
    kind, literal = _base_type(hint)
    help_ = meta.get("help", "")
    if meta.get("positional"):
        return [f.name], {"nargs": "?", "default": default, "help": help_}
    flags = [meta.get("flag", "--" + f.name.replace("_", "-")), *meta.get("aliases", ())]
    kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": help_}
    parse = meta.get("parse") or (kind if isinstance(kind, str) else None)
    if kind is bool and "value_into" in meta:  # --allocate alone, or --allocate BUDGET
        return flags, {**kwargs, "action": SwitchWithValue, "into": meta["value_into"], "type": _PARSERS[parse],
                       "metavar": meta["metavar"]}
    if kind is bool:
        return flags, {**kwargs, "action": "store_true"}
    kwargs["type"] = _PARSERS.get(parse, kind)
    choices = meta.get("choices") or literal
    if choices:
        kwargs["choices"] = list(choices)
    if meta.get("metavar"):
        kwargs["metavar"] = meta["metavar"]
    elif parse in ("names", "ints", "floats"):
        kwargs["metavar"] = {"names": "A,B", "ints": "0,1,2", "floats": "0.5,1,2"}[parse]
    return flags, kwargs


class Options:
    """Adds the options of config fields to one parser. Its state is what several configs of one
    command share: argument groups by title, mutually exclusive groups by name, and the fields
    already added (a field of several configs is one flag)."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser
        self._groups: dict[str, Any] = {}
        self._exclusive: dict[str, Any] = {}
        self._fields: set[str] = set()

    def add(self, *configs: type, only: tuple[str, ...] | None = None, skip: tuple[str, ...] = (),
            defaults: dict[str, Any] | None = None, helps: dict[str, str] | None = None) -> Options:
        """Add the options of ``configs``' fields: all of them, or ``only`` those, less ``skip``;
        ``defaults``/``helps`` change a field's default or help for this command alone. A field holding
        a config (``TrainConfig.lora``) adds its fields, at its default's values (``only`` it: all)."""
        for cls in configs:
            self._add(cls, None, only, skip, defaults or {}, helps or {})
        return self

    def _add(self, cls: type, held: Any, only: tuple[str, ...] | None, skip: tuple[str, ...],
             defaults: dict[str, Any], helps: dict[str, str]) -> None:
        """``cls``' options, at the values of ``held`` (a held config's default) if given."""
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in self._fields or f.name in skip or not f.metadata.get("cli", True):
                continue
            if (inner := _held(f)) is not None:
                self._add(type(inner), inner, None if only and f.name in only else only, skip, defaults, helps)
            elif not only or f.name in only:
                self._fields.add(f.name)
                flags, kwargs = _argument(f, hints[f.name], defaults.get(f.name, getattr(held, f.name, f.default)))
                kwargs["help"] = helps.get(f.name, kwargs["help"])
                self._target(f.metadata).add_argument(*flags, **kwargs)

    def _target(self, meta: Mapping[str, Any]):
        """The parser, argument group or mutually exclusive group a field's option goes into."""
        target: Any = self.parser
        if "group" in meta:
            title = meta["group"]
            if title not in self._groups:
                self._groups[title] = self.parser.add_argument_group(title)
            target = self._groups[title]
        if "exclusive" in meta:
            key = meta["exclusive"]
            if key not in self._exclusive:
                self._exclusive[key] = target.add_mutually_exclusive_group()
            target = self._exclusive[key]
        return target


def _held(f: dataclasses.Field) -> Any:
    """The default of a command-line field that holds a config (a dataclass instance), else None."""
    return f.default if dataclasses.is_dataclass(f.default) and f.metadata.get("cli", True) else None


def values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The parsed options that are fields of ``cls``; a field holding a config, that config from its
    own fields' options (its default's values where this command has none)."""
    fields = dataclasses.fields(cls)
    held = {f.name: dataclasses.replace(h, **values(type(h), args)) for f in fields if (h := _held(f)) is not None}
    return {**{f.name: getattr(args, f.name) for f in fields if hasattr(args, f.name) and f.name not in held}, **held}


def build(cls: type, args: argparse.Namespace, **extra: Any):
    """``cls`` from the parsed options that are its fields (``extra`` on top)."""
    return cls(**{**values(cls, args), **extra})


def command(sub, name: str, help: str, description: str = "", epilog: str = "") -> argparse.ArgumentParser:
    """A subcommand in plop's help format."""
    return sub.add_parser(name, help=help, description=description or None, epilog=epilog or None,
                          formatter_class=Formatter)
