"""What a diagnosis costs, side by side in one run.

SmolLM2-135M (the embedded default), 64 GSM8K questions (../shared/data/gsm8k/train.jsonl when
present, else plop's demo data), max length 256, batch 8, 2 threads. Each variant runs in its own
fresh worker process (so peak memory is its own), on the same token batches:

  (a) forward   a plain no-grad forward of the full model (logits included)
  (b) diagnose  plop.diagnose: closed-form NFN, hooks reading the modules' own outputs, no head
  (c) mc        the authors' estimator: a fresh random unit vector per token and a second matmul
                per module, under a full forward

Targets: (b)/(a) time <= 1.0 and peak memory <= 1.1x; (c)/(b) time >= 2.5. The ratios are the last
line printed; the numbers go to benchmarks/results/bench_diagnose.json.

    python benchmarks/bench_diagnose.py [--samples 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GSM8K = HERE.parent.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
VARIANTS = ("forward", "diagnose", "mc")


def rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so the peak covers only what follows."""
    Path("/proc/self/clear_refs").write_text("5")


def questions(n: int) -> tuple[list[str], str]:
    if GSM8K.is_file():
        rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:n]]
        return [r["question"] for r in rows], str(GSM8K)
    from plop.data import DEMO_DATA

    rows = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()[:n]]
    return [r["prompt"] for r in rows], "plop demo data"


def worker(variant: str, samples: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(2)
    from plop import diagnose
    from plop.collector import NFNCollector, find_linear_modules
    from plop.models import load_model

    model, tokenizer, _ = load_model(None, device="cpu")
    model.eval()
    texts, _ = questions(samples)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    batches = [tokenizer(texts[i : i + 8], padding=True, truncation=True, max_length=256, return_tensors="pt",
                         padding_side="right") for i in range(0, len(texts), 8)]

    def forward() -> None:
        with torch.no_grad():
            for b in batches:
                model(**b, use_cache=False)

    def plop_diagnose() -> None:
        diagnose(model, batches)

    def monte_carlo() -> None:
        with torch.no_grad(), NFNCollector(find_linear_modules(model), estimator="monte_carlo") as collector:
            for b in batches:
                collector.start_batch(b["attention_mask"])
                model(**b, use_cache=False)

    run = {"forward": forward, "diagnose": plop_diagnose, "mc": monte_carlo}[variant]
    run()  # warm-up: first-call allocations and lazy initialisation are not what we measure
    base = rss_mib("VmRSS")
    reset_peak()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {"variant": variant, "seconds": min(times), "all_seconds": times, "peak_mib": rss_mib("VmHWM"),
            "base_mib": base, "peak_extra_mib": rss_mib("VmHWM") - base,
            "tokens": int(sum(int(b["attention_mask"].sum()) for b in batches))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.samples, args.repeats)))
        return

    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    results = {}
    for variant in VARIANTS:  # one at a time: two torch processes on 2 cores oversubscribe
        out = subprocess.run([sys.executable, __file__, "--worker", variant, "--samples", str(args.samples),
                              "--repeats", str(args.repeats)], capture_output=True, text=True, env=env, check=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[variant]
        print(f"{variant:>9}: {r['seconds']:.2f} s (best of {args.repeats}), peak RSS {r['peak_mib']:.0f} MiB "
              f"(+{r['peak_extra_mib']:.0f} over the loaded model), {r['tokens']} tokens")

    a, b, c = (results[v] for v in VARIANTS)
    ratios = {
        "diagnose/forward time": b["seconds"] / a["seconds"],
        "diagnose/forward peak memory": b["peak_mib"] / a["peak_mib"],
        "mc/diagnose time": c["seconds"] / b["seconds"],
    }
    targets = {"diagnose/forward time": ("<=", 1.0), "diagnose/forward peak memory": ("<=", 1.1),
               "mc/diagnose time": (">=", 2.5)}
    met = {k: (v <= targets[k][1]) if targets[k][0] == "<=" else (v >= targets[k][1]) for k, v in ratios.items()}
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    _, source = questions(args.samples)
    (out_dir / "bench_diagnose.json").write_text(json.dumps(
        {"model": "SmolLM2-135M-Instruct", "data": source, "samples": args.samples, "max_length": 256,
         "batch_size": 8, "threads": 2, "results": results, "ratios": ratios, "targets": targets, "met": met},
        indent=2) + "\n")
    print("ratios: " + ", ".join(f"{k} = {v:.2f} ({'ok' if met[k] else 'MISSED'} {targets[k][0]} {targets[k][1]})"
                                 for k, v in ratios.items()))


if __name__ == "__main__":
    main()
