"""What ``--shard`` saves: weight bytes and peak memory per process at 1, 2 and 4 processes.

Saves a random-weight LLaMA-architecture model (default: 18 layers of width 1024, MLP 4096, about
1.15 GiB of float32 weights) with plop's tiny character tokenizer, then diagnoses it on plop's
demo rows under ``torchrun`` (gloo, one thread per process), each run in fresh processes:

  one            a single process, the whole model (the reference report)
  data-parallel  N processes, each loading the whole model (``plop.model.loading.load_model``)
  sharded        N processes, each building the model on the meta device and reading only its
                 FSDP2 shards from the safetensors file (``load_model(shard=True)``,
                 ``diagnose(shard=True)``)

Every process reports the bytes of parameters it holds (its shards, or whole tensors), its peak
resident memory (``VmHWM``) with the anonymous / file-backed split at the end, and its load and
diagnose seconds; rank 0 also the NFN of every module, which must match the single process's.
Numbers go to results/bench_sharded.json.

    python benchmarks/bench_sharded.py [--layers 18] [--hidden 1024] [--processes 2 4] [--samples 8]
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
sys.path.insert(0, str(HERE.parent / "tests"))  # the tiny character tokenizer the tests use

from bench_diagnose import rss_mib  # noqa: E402
from bench_offload import save_model  # noqa: E402


def child(args) -> None:
    """One process of a run: load, diagnose, write this process's numbers to OUT/rank-R.json."""
    import torch

    import plop
    from plop.files.data import load_examples
    from plop.utils.distributed import finish, init_from_env
    from plop.model.loading import load_model
    from plop.model.sharding import held_bytes

    torch.set_num_threads(1)
    world = init_from_env()
    shard = args.child == "sharded"
    start = time.perf_counter()
    model, tokenizer, _ = load_model(args.model, device="cpu", shard=shard)
    loaded = time.perf_counter() - start
    examples, _ = load_examples(None, samples=args.samples, seed=0, tokenizer=tokenizer)
    report = plop.diagnose(model, [e.text for e in examples], tokenizer, samples=None, max_length=args.max_length,
                           batch_size=args.batch_size, shard=shard)
    result = {
        "rank": world.rank, "held_bytes": held_bytes(model), "load_seconds": round(loaded, 2),
        "diagnose_seconds": report.data["seconds"], "peak_rss_mib": round(rss_mib("VmHWM"), 1),
        "rss_anon_mib": round(rss_mib("RssAnon"), 1), "rss_file_mib": round(rss_mib("RssFile"), 1),
    }
    if world.is_main:
        result.update(nfn={m.name: m.nfn for m in report.modules}, recommendation=report.recommendation.types,
                      tokens=report.data["token_count"])
    Path(args.out, f"rank-{world.rank}.json").write_text(json.dumps(result))
    finish()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(variant: str, processes: int, args, model: Path) -> list[dict]:
    """Every process's numbers for one run, by rank."""
    with tempfile.TemporaryDirectory(prefix="plop-bench-shard-run-") as out:
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
                    str(_free_port())] if processes > 1 else []
        command = [sys.executable, *launcher, __file__, "--child", variant, "--model", str(model), "--out", out,
                   "--samples", str(args.samples), "--batch-size", str(args.batch_size),
                   "--max-length", str(args.max_length)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PLOP_DIST_TIMEOUT": "600"}
        subprocess.run(command, check=True, env=env, timeout=900, stdout=subprocess.DEVNULL)
        return [json.loads(Path(out, f"rank-{r}.json").read_text()) for r in range(processes)]


def summary(variant: str, processes: int, ranks: list[dict], reference: dict) -> dict:
    """One row: the largest per-process figures (the process a machine must fit), NFN against one process."""
    nfn = ranks[0]["nfn"]
    return {
        "variant": variant, "processes": processes,
        "held_mib_per_process": [round(r["held_bytes"] / 2**20, 1) for r in ranks],
        "peak_rss_mib_per_process": [r["peak_rss_mib"] for r in ranks],
        "rss_anon_mib_per_process": [r["rss_anon_mib"] for r in ranks],
        "rss_file_mib_per_process": [r["rss_file_mib"] for r in ranks],
        "load_seconds": max(r["load_seconds"] for r in ranks),
        "diagnose_seconds": max(r["diagnose_seconds"] for r in ranks),
        "nfn_max_rel_diff_vs_one": max(abs(nfn[n] - v) / abs(v) for n, v in reference["nfn"].items()),
        "same_recommendation": ranks[0]["recommendation"] == reference["recommendation"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--processes", type=int, nargs="+", default=[2, 4])
    p.add_argument("--samples", type=int, default=8, help="demo rows")
    p.add_argument("--batch-size", type=int, default=2, help="rows per batch: 4 batches to deal out")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--child", choices=("one", "data-parallel", "sharded"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="plop-bench-shard-") as where:
        model = Path(where) / "model"
        weight_bytes = save_model(model, args.layers, args.hidden)
        one = run("one", 1, args, model)
        rows = [summary("one", 1, one, one[0])]
        for n in args.processes:
            for variant in ("data-parallel", "sharded"):
                rows.append(summary(variant, n, run(variant, n, args, model), one[0]))
    result = {"model": {"layers": args.layers, "hidden": args.hidden, "weights_mib": round(weight_bytes / 2**20, 1)},
              "samples": args.samples, "batch_size": args.batch_size, "max_length": args.max_length,
              "tokens": one[0]["tokens"], "cpu_threads_per_process": 1, "rows": rows}
    (HERE / "results" / "bench_sharded.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"model weights {result['model']['weights_mib']:.0f} MiB float32, {args.samples} demo rows "
          f"({result['tokens']} tokens), batches of {args.batch_size}, one thread per process")
    print(f"{'run':14s} {'N':>2s} {'weights/process MiB':>20s} {'x whole':>8s} {'peak RSS/process MiB':>21s} "
          f"{'load s':>7s} {'diagnose s':>11s} {'x one':>6s} {'NFN rel diff':>13s}")
    whole, seconds = weight_bytes / 2**20, rows[0]["diagnose_seconds"]
    for r in rows:
        held, peak = max(r["held_mib_per_process"]), max(r["peak_rss_mib_per_process"])
        print(f"{r['variant']:14s} {r['processes']:2d} {held:20.1f} {held / whole:8.3f} {peak:21.0f} "
              f"{r['load_seconds']:7.1f} {r['diagnose_seconds']:11.1f} {r['diagnose_seconds'] / seconds:6.2f} "
              f"{r['nfn_max_rel_diff_vs_one']:13.1e}")


if __name__ == "__main__":
    main()
