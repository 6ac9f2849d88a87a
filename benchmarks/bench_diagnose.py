"""What a diagnosis costs, side by side in one run.

SmolLM2-135M (the embedded default), 64 GSM8K questions (../shared/data/gsm8k/train.jsonl when
present, else plop's demo data), max length 256, batch 8, 2 threads. Each variant runs in its own
fresh worker process (so peak memory is its own), on the same token batches:

  (a) forward   a plain no-grad forward of the full model (logits included)
  (b) diagnose  plop.diagnose: closed-form NFN, hooks reading the modules' own outputs, no head
  (c) mc        the authors' estimator: a fresh random unit vector per token and a second matmul
                per module, under a full forward
  (d) gradient  a gradient-based importance score: one forward + backward of the LM loss per batch,
                per-module weight-gradient norms
  brute force   choosing the placement by fine-tuning every candidate: read from the placement
                study's results (benchmarks/results/placement_study.json) when it has been run

Sample efficiency (--part samples): one pass over 1024 rows, one row at a time, keeps each row's
per-module sums; diagnoses on random subsets of 8 ... 256 rows (several seeds) are then exact
re-aggregations, compared with the 1024-row diagnosis by Kendall tau of the type ranking and
agreement of the recommended top-3 set.

Targets: (b)/(a) time <= 1.0 and peak memory <= 1.1x; (c)/(b) time >= 2.5. The ratios are the last
line printed; the numbers go to benchmarks/results/bench_diagnose.json (and
bench_diagnose_samples.json for --part samples).

    python benchmarks/bench_diagnose.py [--samples 64] [--repeats 3] [--part cost|samples]
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
VARIANTS = ("forward", "diagnose", "mc", "gradient")
SUBSET_SIZES = (8, 16, 32, 64, 128, 256)


def rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so the peak covers only what follows."""
    Path("/proc/self/clear_refs").write_text("5")


def questions(n: int, with_answers: bool = False) -> tuple[list[str], str]:
    if GSM8K.is_file():
        rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:n]]
        return [r["question"] + ("\n" + r["answer"] if with_answers else "") for r in rows], str(GSM8K)
    from plop.data import DEMO_DATA

    rows = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()[:n]]
    return [r["prompt"] + ("\n" + r["response"] if with_answers else "") for r in rows], "plop demo data"


def load_default():
    import torch

    torch.set_num_threads(2)
    from plop.models import load_model

    model, tokenizer, _ = load_model(None, device="cpu")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return model.eval(), tokenizer


def worker(variant: str, samples: int, repeats: int) -> dict:
    import torch

    from plop import diagnose
    from plop.collector import NFNCollector
    from plop.layers import find_linear_modules

    model, tokenizer = load_default()
    texts, _ = questions(samples)
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

    linear = find_linear_modules(model)

    def gradient() -> None:
        norms = {name: 0.0 for name in linear}
        for b in batches:
            labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
            model(**b, labels=labels, use_cache=False).loss.backward()
            for name, module in linear.items():
                norms[name] += float(module.weight.grad.norm())
            model.zero_grad(set_to_none=True)

    run = {"forward": forward, "diagnose": plop_diagnose, "mc": monte_carlo, "gradient": gradient}[variant]
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


def kendall_tau(a: list[str], b: list[str]) -> float:
    """Kendall tau between two rankings of the same items (no ties)."""
    pos_b = {t: i for i, t in enumerate(b)}
    pairs = [(i, j) for i in range(len(a)) for j in range(i + 1, len(a))]
    concordant = sum(pos_b[a[i]] < pos_b[a[j]] for i, j in pairs)
    return (2 * concordant - len(pairs)) / len(pairs)


def sample_efficiency(rows: int, seeds: int) -> dict:
    """Per-row, per-module sums from one pass; subsets re-aggregated exactly."""
    import numpy as np
    import torch

    from plop.collector import _COUNT, _SUM, NFNCollector
    from plop.layers import find_linear_modules
    from plop.roles import role_types

    model, tokenizer = load_default()
    texts, source = questions(rows, with_answers=True)
    modules = find_linear_modules(model)
    names = list(modules)
    sums = np.zeros((len(texts), len(names)))
    counts = np.zeros((len(texts), len(names)))
    start = time.perf_counter()
    with torch.no_grad(), NFNCollector(modules, n_bootstrap=1) as collector:
        for i, text in enumerate(texts):  # one row per forward: no padding, and rows stay separable
            batch = tokenizer([text], truncation=True, max_length=256, return_tensors="pt")
            before = np.array([[collector.stats[n].sums[_SUM], collector.stats[n].sums[_COUNT]] for n in names])
            collector.start_batch(batch["attention_mask"])
            model.model(**batch, use_cache=False)
            collector.flush()
            after = np.array([[collector.stats[n].sums[_SUM], collector.stats[n].sums[_COUNT]] for n in names])
            sums[i], counts[i] = (after - before).T
            if i % 128 == 127:
                print(f"  {i + 1}/{len(texts)} rows, {time.perf_counter() - start:.0f} s", flush=True)
    baselines = np.array([collector.stats[n].baseline for n in names])
    role_map = role_types(names)
    types = [role_map[n] for n in names]
    order = sorted(set(types))

    def ranking(subset: np.ndarray) -> list[str]:
        nfn = sums[subset].sum(0) / counts[subset].sum(0) / baselines
        means = {t: nfn[[k for k, tk in enumerate(types) if tk == t]].mean() for t in order}
        return sorted(order, key=means.get)

    reference = ranking(np.arange(len(texts)))
    table = {}
    for n in (n for n in SUBSET_SIZES if n < len(texts)):
        taus, agree = [], []
        for seed in range(seeds):
            subset = np.random.default_rng(seed).choice(len(texts), n, replace=False)
            r = ranking(subset)
            taus.append(kendall_tau(r, reference))
            agree.append(set(r[:3]) == set(reference[:3]))
        table[n] = {"kendall_tau_mean": float(np.mean(taus)), "kendall_tau_min": float(np.min(taus)),
                    "top3_agreement": float(np.mean(agree))}
        print(f"  {n:>4} rows: Kendall tau vs {len(texts)} rows {np.mean(taus):.3f} (min {np.min(taus):.3f}), "
              f"top-3 set agrees in {np.mean(agree):.0%} of {seeds} seeds")
    return {"data": source, "reference_rows": len(texts), "reference_ranking": reference, "seeds": seeds,
            "seconds_for_pass": time.perf_counter() - start, "subsets": table}


def brute_force_seconds() -> float | None:
    """Seconds to pick a placement by fine-tuning each candidate once (one seed), from the study."""
    study = HERE / "results" / "placement_study.json"
    if not study.is_file():
        return None
    runs = json.loads(study.read_text())["runs"]
    first_seed = min(r["seed"] for r in runs)
    return sum(r["seconds_per_step"] * r["steps"] for r in runs if r["seed"] == first_seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["cost", "samples"], default="cost")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=1024, help="--part samples: rows of the reference diagnosis")
    parser.add_argument("--seeds", type=int, default=10, help="--part samples: random subsets per size")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.samples, args.repeats)))
        return
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    if args.part == "samples":
        result = sample_efficiency(args.rows, args.seeds)
        (out_dir / "bench_diagnose_samples.json").write_text(json.dumps(result, indent=2) + "\n")
        print("ratios: " + ", ".join(f"tau@{n} = {v['kendall_tau_mean']:.2f}" for n, v in result["subsets"].items()))
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

    a, b, c, d = (results[v] for v in VARIANTS)
    ratios = {
        "diagnose/forward time": b["seconds"] / a["seconds"],
        "diagnose/forward peak memory": b["peak_mib"] / a["peak_mib"],
        "mc/diagnose time": c["seconds"] / b["seconds"],
        "gradient/diagnose time": d["seconds"] / b["seconds"],
        "gradient/diagnose peak memory": d["peak_mib"] / b["peak_mib"],
    }
    brute = brute_force_seconds()
    if brute is not None:
        ratios["brute-force/diagnose time"] = brute / b["seconds"]
        print(f"brute force: {brute:.0f} s of fine-tuning to try each placement once (placement study, one seed)")
    targets = {"diagnose/forward time": ("<=", 1.0), "diagnose/forward peak memory": ("<=", 1.1),
               "mc/diagnose time": (">=", 2.5)}
    met = {k: (v <= targets[k][1]) if targets[k][0] == "<=" else (v >= targets[k][1]) for k, v in ratios.items()
           if k in targets}
    _, source = questions(args.samples)
    (out_dir / "bench_diagnose.json").write_text(json.dumps(
        {"model": "SmolLM2-135M-Instruct", "data": source, "samples": args.samples, "max_length": 256,
         "batch_size": 8, "threads": 2, "results": results, "brute_force_seconds": brute, "ratios": ratios,
         "targets": targets, "met": met}, indent=2) + "\n")
    print("ratios: " + ", ".join(
        f"{k} = {v:.2f}" + (f" ({'ok' if met[k] else 'MISSED'} {targets[k][0]} {targets[k][1]})" if k in met else "")
        for k, v in ratios.items()))


if __name__ == "__main__":
    main()
