"""Does a quantized base get the full-precision advice? Two reports of one model on the same rows.

QLoRA trains its adapters on a quantized base, so that is the base to diagnose; the question is
whether quantizing moves the advice. Per type, the relative change of mean NFN says how far the
measurement moved. Where the recommended types differ, the bootstrap says whether that is news:
a type whose selection probability lies strictly inside :data:`NOISE_BAND` in either report was
already a coin toss at one precision, so swapping it is within noise; a type the bootstrap was sure
of in both reports that still flips is beyond noise.
"""

from __future__ import annotations

from dataclasses import dataclass

from .report import Report

NOISE_BAND = (0.1, 0.9)  # selection probabilities strictly inside: the bootstrap is not sure of the type
VERDICTS = ("same", "within noise", "beyond noise")


@dataclass
class TypeShift:
    """One module type at full precision and quantized."""

    type: str
    nfn_full: float
    nfn_quantized: float
    relative_change: float  # nfn_quantized / nfn_full - 1
    recommended_full: bool
    recommended_quantized: bool
    uncertain: bool  # selection probability strictly inside NOISE_BAND in either report


@dataclass
class PrecisionCheck:
    """How quantization moved the diagnosis: per type, and the verdict on the recommendation."""

    quantization: str
    types: list[TypeShift]  # the full-precision ranking's order
    changed: list[str]  # types recommended at one precision only
    verdict: str  # one of VERDICTS

    @property
    def max_relative_change(self) -> float:
        return max((abs(t.relative_change) for t in self.types), default=0.0)

    def summary(self) -> str:
        """One line for a terminal."""
        head = f"{self.quantization} vs full precision: mean NFN moves ≤ {self.max_relative_change:.1%} per type; "
        if self.verdict == "same":
            return head + "same recommendation"
        low, high = NOISE_BAND
        return head + (f"recommendation differs in {', '.join(self.changed)}, {self.verdict} (bootstrap selection "
                       f"probability {'inside' if self.verdict == 'within noise' else 'outside'} "
                       f"{low:.0%}–{high:.0%} {'in a report' if self.verdict == 'within noise' else 'in both'})")


def _uncertain(*probabilities: float | None) -> bool:
    low, high = NOISE_BAND
    return any(p is not None and low < p < high for p in probabilities)


def compare_precision(full: Report, quantized: Report) -> PrecisionCheck:
    """Per-type relative NFN change from ``full`` to ``quantized`` (the same model and rows), and
    whether the recommended types differ beyond the bootstrap's own uncertainty."""
    by_type = {t.type: t for t in quantized.types}
    rec_full, rec_quant = set(full.recommendation.types), set(quantized.recommendation.types)
    shifts = [
        TypeShift(type=f.type, nfn_full=f.nfn_mean, nfn_quantized=q.nfn_mean,
                  relative_change=q.nfn_mean / f.nfn_mean - 1 if f.nfn_mean else float("inf"),
                  recommended_full=f.type in rec_full, recommended_quantized=f.type in rec_quant,
                  uncertain=_uncertain(f.selection_probability, q.selection_probability))
        for f in full.types if (q := by_type.get(f.type)) is not None
    ]
    changed = sorted(rec_full ^ rec_quant)
    uncertain = {t.type for t in shifts if t.uncertain}
    verdict = "same" if not changed else "within noise" if set(changed) <= uncertain else "beyond noise"
    return PrecisionCheck(quantization=quantized.model.get("quantization") or "quantized", types=shifts,
                          changed=changed, verdict=verdict)


def _rows(report: Report) -> dict:
    """What the report records of its data (source, hash, row indices, token count), less the timing."""
    return {key: value for key, value in report.data.items() if key != "seconds"}


def quantization_pair(a: Report, b: Report) -> tuple[Report, Report] | None:
    """``(full, quantized)`` when ``a`` and ``b`` differ only in that one of them is quantized
    (same model, data rows and settings), else None: only then is the difference quantization's."""
    same = a.model["id"] == b.model["id"] and _rows(a) == _rows(b) and a.settings == b.settings
    qa, qb = a.model.get("quantization"), b.model.get("quantization")
    if not same or (qa is None) == (qb is None):
        return None
    return (a, b) if qa is None else (b, a)
