"""``plop check``: audit any LoRA config against the real model's structure, without its weights.

:func:`check` reads a config of any stack (:mod:`.readers`), builds the model from its
``config.json`` on the meta device (:mod:`.meta`), applies the stack's key semantics and lets PEFT
wrap it (:mod:`.resolve`), and reports what is trained and what goes wrong (:mod:`.findings`).
"""

from .check import check
from .findings import Finding
from .readers import inline_spec, read_config
from .result import EXIT_CLEAN, EXIT_ERRORS, CheckResult
from .spec import AdapterSpec

__all__ = ["AdapterSpec", "CheckResult", "EXIT_CLEAN", "EXIT_ERRORS", "Finding", "check", "inline_spec", "read_config"]
