"""axolotl Spectrum-style partial full fine-tuning: ``unfrozen_parameters``, regexes of the
parameters to train, all others frozen. Key and pattern rules: axolotl-ai-cloud/axolotl
src/axolotl/utils/schemas/config.py (unfrozen_parameters) and src/axolotl/utils/freeze.py
(freeze_layers_except / LayerNamePattern: re.match from the start, and every ``.`` not followed by
``+`` is a literal dot, so names are written with plain dots and no backslashes)."""

from __future__ import annotations

from typing import Any

from .result import ExportResult, finish
from .target import Target

NAME = "spectrum"
read = None  # partial full fine-tuning: no LoRA to read back


def claims(data: Any) -> bool:
    return False  # unfrozen_parameters sit in a whole axolotl config, which axolotl's keys claim


def write(t: Target) -> ExportResult:
    patterns = [f"^{name}.weight$" for name in t.modules]
    patterns += [f"^.+.{p}$" for p in t.target_parameters or []]  # ".+" stays a wildcard in axolotl
    warnings = ["full fine-tuning of the selected weights: rank, alpha, dropout, DoRA and LoRA+ do not apply; "
                "biases, embeddings and lm_head stay frozen"]
    return finish(t, NAME, {"unfrozen_parameters": patterns}, "spectrum-unfrozen.yaml", warnings, True)
