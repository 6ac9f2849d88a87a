"""``plop check``: audit any LoRA config against the real model's structure, without its weights.

:func:`check` reads a config of any stack (:mod:`plop.stacks`), builds the model from its
``config.json`` on the meta device (:mod:`.meta`), applies the stack's key semantics and lets PEFT
wrap it (:mod:`.resolve`), and reports what is trained and what goes wrong (:mod:`.findings`).
"""

from __future__ import annotations

import importlib
from typing import Any

# lazy (PEP 562), as plop's top level: plop export reads its own output back through .verify, and
# must not pay for the meta-device model builder (torch, PEFT) it never uses
_EXPORTS = {"check": ".check", "Finding": ".result", "inline_spec": ".check",
            "EXIT_CLEAN": ".result", "EXIT_ERRORS": ".result", "CheckResult": ".result"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'plop.audit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
