"""The ``plop`` command line: a thin layer over the Python API, one module per command.

Each command module's ``register`` adds its parser (options generated from the config fields,
:mod:`.options`) beside its handler. Every user error ends as one line on stderr and exit code 2
(``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from ..errors import PlopError
from ..utils.untrusted import plain_safe
from ..version import __version__
from . import adapters, check, compare, diagnose, reports, train
from .options import EXIT_USAGE, Formatter, Parser

COMMANDS = (diagnose, reports, check, train, compare, adapters)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="plop", formatter_class=Formatter,
                    description="Where to put LoRA adapters, measured before you fine-tune (PLoP, arXiv 2506.20629).",
                    epilog="run 'plop COMMAND --help' for a command's options and examples")
    parser.add_argument("--version", action="version", version=f"plop {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def _friendly(error: BaseException) -> str | None:
    """The one-line message for an error the user can act on, or None for a bug."""
    if isinstance(error, PlopError):
        return str(error)
    torch = sys.modules.get("torch")  # never imported: the error cannot be torch's
    if (torch is not None and isinstance(error, torch.OutOfMemoryError)) or (
        isinstance(error, RuntimeError) and ("out of memory" in str(error) or "can't allocate memory" in str(error))
    ):
        return ("out of memory: try a smaller --batch-tokens (diagnose), --batch-size or --max-length "
                "(or --dtype bfloat16)")
    if torch is not None and isinstance(error, torch.distributed.DistError):  # a peer died or hung
        return f"another process of this job stopped or timed out: {str(error).splitlines()[0]}"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    return None


def _fail(message: str) -> int:
    """One line on stderr, exit code 2 (a process of a launched job leaves at once: see
    :func:`plop.utils.distributed.leave`)."""
    line = plain_safe(f"plop: error: {message}")
    distributed = sys.modules.get("plop.utils.distributed")
    if distributed is not None and distributed.world().parallel:
        distributed.leave(line, EXIT_USAGE)
    print(line, file=sys.stderr, flush=True)
    return EXIT_USAGE


def _quiet_libraries(debug: bool) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not debug:  # read by transformers when (and only if) a command imports it
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        # bitsandbytes warns at import on CPUs without its optional kernels, and the `kernels`
        # package it then asks (a transformers dependency) warns when the hub is offline: neither
        # is the user's concern
        for library in ("bitsandbytes", "kernels"):
            logging.getLogger(library).setLevel(logging.ERROR)
    warnings.simplefilter("default")
    # libraries' deprecations (torch.jit under bitsandbytes, ...) are for their authors, not plop's users
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.formatwarning = lambda msg, *a, **k: plain_safe(f"plop: warning: {msg}") + "\n"


def main(argv: list[str] | None = None) -> int:
    code = _run(argv)
    if "plop.utils.distributed" in sys.modules:  # only a command that loaded a model joined a group
        sys.modules["plop.utils.distributed"].finish(code)
    return code


def _run(argv: list[str] | None) -> int:
    args = None
    try:
        args = build_parser().parse_args(argv)
        with warnings.catch_warnings():
            _quiet_libraries(args.debug)
            return args.func(args)
    except KeyboardInterrupt:
        return interrupted()
    except Exception as error:  # noqa: BLE001 - turned into a one-line message or re-raised
        message = _friendly(error)
        if message is None or (args is not None and args.debug):
            raise
        return _fail(message)


def interrupted() -> int:
    print("plop: interrupted", file=sys.stderr)
    return 130
