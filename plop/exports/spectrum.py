"""axolotl Spectrum-style partial full fine-tuning: ``unfrozen_parameters``, regexes of the
parameters to train, all others frozen. Key and pattern rules: axolotl-ai-cloud/axolotl
src/axolotl/utils/schemas/config.py (unfrozen_parameters) and src/axolotl/utils/freeze.py
(freeze_layers_except / LayerNamePattern: re.match from the start, and every ``.`` not followed by
``+`` is a literal dot, so names are written with plain dots and no backslashes)."""

from __future__ import annotations

from .result import ExportResult, finish
from .target import Target


def export(t: Target) -> ExportResult:
    patterns = [f"^{name}.weight$" for name in t.modules]
    patterns += [f"^.+.{p}$" for p in t.target_parameters or []]  # ".+" stays a wildcard in axolotl
    warnings = ["full fine-tuning of the selected weights: rank, alpha, dropout, DoRA and LoRA+ do not apply; "
                "biases, embeddings and lm_head stay frozen"]
    return finish(t, "spectrum", {"unfrozen_parameters": patterns}, "spectrum-unfrozen.yaml", warnings, True)
