"""A model several times bigger than its memory budget, diagnosed with accelerate's disk offload.

Saves a random-weight LLaMA-architecture model (default: 18 layers of width 1024, MLP 4096, about
1.2 GB of float32 weights) with plop's tiny character tokenizer, then diagnoses it on plop's demo
rows twice, each in a fresh process so that each peak is its own:

  full     ``plop.model.loading.load_model(path)``: every weight in memory
  offload  ``load_model(path, max_memory=BUDGET, offload_dir=DIR)``: accelerate keeps BUDGET of
           weights in memory, the rest on disk, read one layer at a time during the forward

Each process reports its peak resident memory (``VmHWM``), split into anonymous memory (what the
process owns) and file-backed pages (memory-mapped weight files: page cache the kernel can drop),
and the NFN of every module; the NFN must be identical. Numbers go to results/bench_offload.json.

    python benchmarks/bench_offload.py [--layers 18] [--hidden 1024] [--budget 300MB] [--samples 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tiny character tokenizer the tests use

from bench_diagnose import rss_mib  # noqa: E402


def save_model(path: Path, layers: int, hidden: int) -> int:
    """A random-weight LLaMA with the character tokenizer; returns the weights' bytes."""
    import torch
    from tiny_lm import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def child(args) -> None:
    """One diagnosis in this process; prints its result as JSON."""
    import torch

    import plop
    from plop.files.data import load_examples
    from plop.model.loading import load_model

    torch.set_num_threads(1)
    start = time.perf_counter()
    offload = args.child == "offload"
    with tempfile.TemporaryDirectory(prefix="plop-offload-") as where:
        model, tokenizer, _ = load_model(args.model, device="cpu", max_memory=args.budget if offload else None,
                                         offload_dir=where if offload else None)
        loaded = time.perf_counter() - start
        examples, _ = load_examples(None, samples=args.samples, seed=0, tokenizer=tokenizer)
        report = plop.diagnose(model, [e.text for e in examples], tokenizer, samples=None, max_length=args.max_length,
                               batch_size=args.samples)
        placement = sorted({str(d) for d in getattr(model, "hf_device_map", {"": "cpu"}).values()})
    print(json.dumps({
        "variant": args.child, "placement": placement, "load_seconds": round(loaded, 2),
        "diagnose_seconds": report.data["seconds"], "tokens": report.data["token_count"],
        "peak_rss_mib": round(rss_mib("VmHWM"), 1), "rss_anon_mib": round(rss_mib("RssAnon"), 1),
        "rss_file_mib": round(rss_mib("RssFile"), 1), "nfn": {m.name: m.nfn for m in report.modules},
        "recommendation": report.recommendation.types,
    }))


def run_child(variant: str, args, model: Path) -> dict:
    command = [sys.executable, __file__, "--child", variant, "--model", str(model), "--budget", args.budget,
               "--samples", str(args.samples), "--max-length", str(args.max_length)]
    proc = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--budget", default="300MB", help="max_memory for the CPU in the offload run")
    p.add_argument("--samples", type=int, default=8, help="demo rows, one batch")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--child", choices=("full", "offload"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="plop-bench-offload-") as where:
        model = Path(where) / "model"
        weight_bytes = save_model(model, args.layers, args.hidden)
        runs = {v: run_child(v, args, model) for v in ("offload", "full")}
    full, off = runs["full"], runs["offload"]
    rel = max(abs(off["nfn"][n] - v) / abs(v) for n, v in full["nfn"].items())
    result = {
        "model": {"layers": args.layers, "hidden": args.hidden, "weights_mib": round(weight_bytes / 2**20, 1)},
        "budget": args.budget, "samples": args.samples, "max_length": args.max_length,
        "runs": {v: {k: r[k] for k in r if k != "nfn"} for v, r in runs.items()},
        "nfn_max_rel_diff": rel, "same_recommendation": full["recommendation"] == off["recommendation"],
        "peak_rss_ratio_offload_over_full": round(off["peak_rss_mib"] / full["peak_rss_mib"], 3),
    }
    out = HERE / "results" / "bench_offload.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    for variant, r in result["runs"].items():
        print(f"{variant:8s} peak RSS {r['peak_rss_mib']:7.0f} MiB (anon {r['rss_anon_mib']:.0f}, file-backed "
              f"{r['rss_file_mib']:.0f}), load {r['load_seconds']:.1f} s, diagnose {r['diagnose_seconds']:.1f} s, "
              f"weights on {r['placement']}")
    print(f"model weights {result['model']['weights_mib']:.0f} MiB, budget {args.budget}; NFN max rel diff {rel:.2e}; "
          f"peak RSS offload/full {result['peak_rss_ratio_offload_over_full']}")


if __name__ == "__main__":
    main()
