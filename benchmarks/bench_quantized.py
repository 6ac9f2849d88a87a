"""Does a QLoRA-style quantized base get the full-precision advice? SmolLM2-135M on the CPU.

The embedded default (SmolLM2-135M-Instruct, its Q4_1 GGUF dequantized to float32: those are the
weights "full precision" means here) is diagnosed on the same demo rows three times: as loaded,
as bitsandbytes 8-bit (LLM.int8) and as 4-bit NF4 (float32 compute), top-3 with the default
200-replicate bootstrap. Printed: per-type mean NFN and its relative change, the three
recommendations, and :func:`plop.ranking.precision.compare_precision`'s verdict (same / within bootstrap
noise / beyond noise). Written: benchmarks/results/bench_quantized.json.

bitsandbytes' 4-bit CPU path is slow without its optional ``kernels`` package (a few seconds per
row at 2 threads), hence few rows by default.

    python benchmarks/bench_quantized.py [--samples 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

import plop
from plop.files.data import load_examples
from plop.model.loading import load_model
from plop.ranking.precision import compare_precision

HERE = Path(__file__).resolve().parent
QUANTIZATIONS = ("none", "bnb-8bit", "bnb-4bit")


def diagnose(quantize: str, samples: int) -> tuple[plop.Report, float]:
    """One diagnosis of the default model at ``quantize`` on the first ``samples`` seeded demo rows."""
    model, tokenizer, model_id = load_model(None, device="cpu", quantize=quantize)
    examples, info = load_examples(None, samples=samples, seed=0, tokenizer=tokenizer)
    start = time.perf_counter()
    report = plop.diagnose(model, examples, tokenizer, samples=None, model_id=model_id, data_info=info, top_k=3)
    return report, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    reports, seconds = {}, {}
    for quantize in QUANTIZATIONS:
        reports[quantize], seconds[quantize] = diagnose(quantize, args.samples)
        print(f"{quantize:9s} {seconds[quantize]:7.1f} s  recommended: {', '.join(reports[quantize].recommendation.types)}")
    full = reports["none"]
    results = {"samples": args.samples, "tokens": full.data["token_count"], "threads": args.threads, "seconds": seconds,
               "recommended": {q: r.recommendation.types for q, r in reports.items()},
               "selection_probability": {q: {t.type: t.selection_probability for t in r.types}
                                         for q, r in reports.items()}}
    print(f"\n{'type':10s} {'NFN fp32':>9s}" + "".join(f" {q:>9s} {'rel':>7s}" for q in QUANTIZATIONS[1:]))
    checks = {q: compare_precision(full, reports[q]) for q in QUANTIZATIONS[1:]}
    for i, t in enumerate(checks["bnb-8bit"].types):
        shifts = [checks[q].types[i] for q in QUANTIZATIONS[1:]]
        print(f"{t.type:10s} {t.nfn_full:9.4f}" + "".join(f" {s.nfn_quantized:9.4f} {s.relative_change:+7.2%}"
                                                          for s in shifts))
    for q, check in checks.items():
        print(check.summary())
        results[q] = {"verdict": check.verdict, "changed": check.changed,
                      "max_relative_change": check.max_relative_change,
                      "relative_change": {t.type: t.relative_change for t in check.types},
                      "nfn": {t.type: t.nfn_quantized for t in check.types}}
    results["none"] = {"nfn": {t.type: t.nfn_mean for t in full.types}}
    out = HERE / "results" / "bench_quantized.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
