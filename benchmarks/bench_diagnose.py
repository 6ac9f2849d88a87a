"""What a diagnosis costs, and how far it is from the limit, side by side in one run.

SmolLM2-135M (the embedded default), 100 GSM8K questions sampled as `plop diagnose --samples 100`
samples them (seed 0; ../shared/data/gsm8k/train.jsonl when present, else plop's demo data), max
length 256, 2 threads. Each variant runs in its own fresh worker process (so peak memory is its own)
on the same rows:

  padded     a plain no-grad forward of the model's body (no head) on the rows in data order,
             padded batches of 8: what any hook-based diagnosis would compute today
  real       the same body forward of the real tokens only, the limit: the rows packed end to end
             into sequences of up to 512 tokens, no padding at all, positions restarting at each
             row (transformers then masks attention within each row; equal to separate rows to
             1e-5). Each row alone is no limit on a CPU: batches of one row run slower than padding.
  sorted     the plain body forward on the batches plop.diagnose builds (length-sorted under the
             token budget, default 8 x 256 tokens): what the diagnosis costs without its hooks
  compiled   the same as sorted through torch.compile(dynamic=True): its first call (the compile)
             is recorded apart as compile_seconds
  diagnose   plop.diagnose on the texts: length-sorted batches under the token budget (default
             8 x 256 tokens), closed-form NFN from the modules' own outputs
  padded-diagnose  plop.diagnose on the padded batches of (padded): the NFN reference (it is what
             plop computed before length-sorted batching) and what sorting saves
  authors    the authors' published estimator, reimplemented from the paper's code: hooks on every
             weight module but embeddings and norms (the head included), under a full forward of
             padded batches of 8; per module and batch it normalises W and the tokens, takes a second
             matmul for ||W z||, a Gaussian direction per token and a third for the baseline, padding
             tokens counted, one host sync per hook
  auto       plop.diagnose with until_stable=True over all of the same question list
  gradient   a gradient-based importance score: forward + backward of the LM loss per padded batch,
             per-module weight-gradient norms
  cli-auto   `plop diagnose --data train.jsonl --until-stable --samples 1024` in a fresh process (question and answer,
             as plop reads GSM8K), end to end (imports, cached model load, data, diagnosis, report),
             against the diagnosis seconds its report records

Targets (issue 10): diagnose/padded time <= 0.65; authors/diagnose >= 8; authors/auto >= 40;
cli-auto end to end / its diagnosis <= 2; per-type NFN of diagnose within 0.1 % of padded-diagnose;
peak memory no more than 1.1x padded-diagnose's (wider batches of short rows stay under the token
budget, batch size x max length, the peak a padded batch of the longest rows reaches). The ratios
are the last line printed; the numbers go to
benchmarks/results/bench_diagnose.json (and bench_diagnose_samples.json for --part samples).

Sample efficiency (--part samples): one pass over 1024 rows, one row at a time, keeps each row's
per-module sums; diagnoses on random subsets of 8 ... 256 rows (several seeds) are then exact
re-aggregations, compared with the 1024-row diagnosis by Kendall tau of the type ranking and
agreement of the recommended top-3 set.

    python benchmarks/bench_diagnose.py [--samples 100] [--repeats 3] [--part cost|samples]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GSM8K = HERE.parent.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
VARIANTS = ("padded", "real", "sorted", "compiled", "diagnose", "padded-diagnose", "authors", "auto", "gradient")
ONCE = {"authors", "gradient"}  # slow: one timed run after a one-batch warm-up
MAX_LENGTH, BATCH = 256, 8
SUBSET_SIZES = (8, 16, 32, 64, 128, 256)


def rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so the peak covers only what follows."""
    Path("/proc/self/clear_refs").write_text("5")


def data_file() -> tuple[Path, str]:
    if GSM8K.is_file():
        return GSM8K, "question"
    from plop.files.data import DEMO_DATA

    return DEMO_DATA, "prompt"


def questions(n: int, with_answers: bool = False) -> tuple[list[str], str]:
    from plop.files.data import sample_indices

    path, field = data_file()
    lines = path.read_text().splitlines()
    rows = [json.loads(lines[i]) for i in sample_indices(len(lines), n, 0)]
    answer = "answer" if field == "question" else "response"
    return [r[field] + ("\n" + r[answer] if with_answers else "") for r in rows], str(path)


def load_default():
    import torch

    torch.set_num_threads(2)
    from plop.model.loading import load_model

    model, tokenizer, _ = load_model(None, device="cpu")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return model.eval(), tokenizer


def authors_estimator(model, batches) -> dict[str, float]:
    """NFN per module the way the paper's code computes it (see the module docstring)."""
    import torch

    sums: dict[str, list[float]] = {}

    def hook_for(name: str):
        def hook(module, args, output) -> None:
            z = args[0].float().reshape(-1, args[0].shape[-1])  # padding tokens included
            w = module.weight.float()
            w = w / ((w**2).mean().sqrt() + 1e-8)
            unit = z / (z.norm(dim=1, keepdim=True) + 1e-8)
            actual = (unit @ w.t()).norm(dim=1).mean().item() / z.shape[1]
            g = torch.randn_like(unit)
            g = g / (g.norm(dim=1, keepdim=True) + 1e-8)
            random = (g @ w.t()).norm(dim=1).mean().item() / z.shape[1]
            totals = sums.setdefault(name, [0.0, 0.0])
            totals[0] += actual
            totals[1] += random
        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in model.named_modules()
               if getattr(m, "weight", None) is not None and not isinstance(m, torch.nn.Embedding)
               and "norm" not in name.lower() and m.weight.ndim == 2]
    try:
        with torch.no_grad():
            for b in batches:
                model(**b, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {name: a / r for name, (a, r) in sums.items()}


def pack_rows(rows: list[list[int]], length: int) -> list[dict]:
    """Rows end to end in sequences of up to ``length`` tokens, positions restarting per row."""
    import torch

    sequences, ids, positions = [], [], []
    for row in rows:
        if ids and len(ids) + len(row) > length:
            sequences.append({"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions])})
            ids, positions = [], []
        ids, positions = ids + row, positions + list(range(len(row)))
    sequences.append({"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions])})
    return sequences


def worker(variant: str, samples: int, repeats: int) -> dict:
    import torch

    from plop import diagnose
    from plop.measure.batching import text_batches

    model, tokenizer = load_default()
    texts, _ = questions(samples)
    batches = [tokenizer(texts[i : i + BATCH], padding=True, truncation=True, max_length=MAX_LENGTH,
                         return_tensors="pt", padding_side="right") for i in range(0, len(texts), BATCH)]
    packed = pack_rows(tokenizer(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"], 512)
    plops = [b.inputs for b in text_batches(texts, tokenizer, max_length=MAX_LENGTH, batch_tokens=BATCH * MAX_LENGTH)]
    extra: dict = {}

    # torch.compile is lazy: nothing compiles until the warm-up's first call
    compiled = torch.compile(model.model, dynamic=True) if variant == "compiled" else None

    def body(inputs, module=None) -> None:
        with torch.no_grad():
            for b in inputs:
                (model.model if module is None else module)(**b, use_cache=False)

    def plop_diagnose(data, **kw):
        def run() -> None:
            report = diagnose(model, data, tokenizer, max_length=MAX_LENGTH, **{"samples": None, **kw})  # all given
            extra.update(samples=report.data["samples"], batch_tokens=report.settings["batch_tokens"],
                         type_nfn={t.type: t.nfn_mean for t in report.types},
                         recommendation=report.recommendation.types)
        return run

    def gradient() -> None:
        linear = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        for b in batches[: 1 if warm else None]:
            labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
            model(**b, labels=labels, use_cache=False).loss.backward()
            for m in linear.values():
                float(m.weight.grad.norm())
            model.zero_grad(set_to_none=True)

    runs = {
        "padded": lambda: body(batches),
        "real": lambda: body(packed),
        "sorted": lambda: body(plops),
        "compiled": lambda: body(plops, compiled),
        "diagnose": plop_diagnose(texts),
        "padded-diagnose": plop_diagnose(batches),
        "authors": lambda: authors_estimator(model, batches[:1] if warm else batches),
        "auto": plop_diagnose(questions(1000)[0], samples=None, until_stable=True),
        "gradient": gradient,
    }
    run = runs[variant]
    warm = True
    start = time.perf_counter()
    run()  # warm-up: first-call allocations, lazy initialisation and compiles are not what we measure
    extra["warm_up_seconds"] = time.perf_counter() - start
    warm = False
    base = rss_mib("VmRSS")
    reset_peak()
    times = []
    for _ in range(1 if variant in ONCE else repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    tokens = {"real_tokens": sum(int(b["attention_mask"].sum()) for b in batches),
              "padded_tokens": sum(b["input_ids"].numel() for b in batches),
              "sorted_tokens": sum(b["input_ids"].numel() for b in plops)}
    return {"variant": variant, "seconds": min(times), "all_seconds": times, "peak_mib": rss_mib("VmHWM"),
            "base_mib": base, "peak_extra_mib": rss_mib("VmHWM") - base, **tokens, **extra}


def cli_auto(repeats: int, env: dict) -> dict:
    """``plop diagnose --until-stable`` end to end, against the diagnosis seconds it reports."""
    path, _ = data_file()
    runs = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "report.json"
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "plop", "diagnose", "--data", str(path), "--until-stable",
                            "--samples", "1024", "--out", str(out)], env=env, check=True, capture_output=True)
            wall = time.perf_counter() - start
            data = json.loads(out.read_text())["data"]
        runs.append({"wall_seconds": wall, "diagnosis_seconds": data["seconds"], "samples": data["samples"]})
    best = min(runs, key=lambda r: r["wall_seconds"] / r["diagnosis_seconds"])
    return {"variant": "cli-auto", **best, "runs": runs}


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

    from plop.measure.collector import _COUNT, _SUM, NFNCollector
    from plop.model.layers import find_linear_modules
    from plop.model.roles import role_types

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


def ratios_of(r: dict) -> dict[str, float]:
    types = r["padded-diagnose"]["type_nfn"]
    return {
        "diagnose/padded time": r["diagnose"]["seconds"] / r["padded"]["seconds"],
        "real/padded time": r["real"]["seconds"] / r["padded"]["seconds"],
        "diagnose/real time": r["diagnose"]["seconds"] / r["real"]["seconds"],
        "real/padded tokens": r["padded"]["real_tokens"] / r["padded"]["padded_tokens"],
        "sorted/padded tokens": r["padded"]["sorted_tokens"] / r["padded"]["padded_tokens"],
        "diagnose/sorted time (the hooks)": r["diagnose"]["seconds"] / r["sorted"]["seconds"],
        "compiled/sorted time": r["compiled"]["seconds"] / r["sorted"]["seconds"],
        "compile/sorted time": r["compiled"]["warm_up_seconds"] / r["sorted"]["seconds"],
        "padded-diagnose/padded time": r["padded-diagnose"]["seconds"] / r["padded"]["seconds"],
        "diagnose/padded peak memory": r["diagnose"]["peak_mib"] / r["padded"]["peak_mib"],
        "diagnose/padded-diagnose peak memory": r["diagnose"]["peak_mib"] / r["padded-diagnose"]["peak_mib"],
        "authors/diagnose time": r["authors"]["seconds"] / r["diagnose"]["seconds"],
        "authors/auto time": r["authors"]["seconds"] / r["auto"]["seconds"],
        "gradient/diagnose time": r["gradient"]["seconds"] / r["diagnose"]["seconds"],
        "cli-auto end to end/its diagnosis": r["cli-auto"]["wall_seconds"] / r["cli-auto"]["diagnosis_seconds"],
        "max per-type NFN change": max(abs(r["diagnose"]["type_nfn"][t] / v - 1) for t, v in types.items()),
    }


TARGETS = {"diagnose/padded time": ("<=", 0.65), "authors/diagnose time": (">=", 8.0),
           "authors/auto time": (">=", 40.0), "cli-auto end to end/its diagnosis": ("<=", 2.0),
           "max per-type NFN change": ("<=", 0.001), "diagnose/padded-diagnose peak memory": ("<=", 1.1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["cost", "samples"], default="cost")
    parser.add_argument("--samples", type=int, default=100)
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
        r = results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{variant:>15}: {r['seconds']:6.2f} s (best of {len(r['all_seconds'])}), "
              f"peak RSS {r['peak_mib']:.0f} MiB"
              + (f", {r['samples']} samples" if "samples" in r else ""), flush=True)
    r = results["cli-auto"] = cli_auto(args.repeats, env)
    print(f"{'cli-auto':>15}: {r['wall_seconds']:6.2f} s end to end, "
          f"of which the diagnosis {r['diagnosis_seconds']:.2f} s"
          f" ({r['samples']} samples)")
    padded = results["padded"]
    print(f"tokens: {padded['real_tokens']} real, {padded['padded_tokens']} in padded batches of {BATCH} "
          f"(real/padded {padded['real_tokens'] / padded['padded_tokens']:.2f})")

    ratios = ratios_of(results)
    brute = brute_force_seconds()
    if brute is not None:
        ratios["brute-force/diagnose time"] = brute / results["diagnose"]["seconds"]
    met = {k: (v <= t) if op == "<=" else (v >= t) for k, (op, t) in TARGETS.items() for v in [ratios[k]]}
    _, source = questions(args.samples)
    (out_dir / "bench_diagnose.json").write_text(json.dumps(
        {"model": "SmolLM2-135M-Instruct", "data": source, "samples": args.samples, "max_length": MAX_LENGTH,
         "batch_size": BATCH, "threads": 2, "results": results, "brute_force_seconds": brute, "ratios": ratios,
         "targets": TARGETS, "met": met}, indent=2) + "\n")
    print("ratios: " + ", ".join(
        f"{k} = {v:.3g}" + (f" ({'ok' if met[k] else 'MISSED'} {TARGETS[k][0]} {TARGETS[k][1]})" if k in met else "")
        for k, v in ratios.items()))


if __name__ == "__main__":
    main()
