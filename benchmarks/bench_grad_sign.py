"""What the grad-sign signal costs (issue 33), side by side in one run on the same model and rows:

  nfn         plop.diagnose on the rows: the default NFN diagnosis (one no-grad pass)
  grad-sign   the signal alone (plop.measure.grad_sign.grad_sign_scores): rank-1 probes on every
              linear module, forward + backward of the causal-LM loss on the first k batches
  train-step  one LoRA training step on the first batch: PEFT r=16 on all linear modules, forward,
              backward, AdamW step (the unit the paper's "under 0.5 % of training" counts in)

Each variant runs in its own fresh process, so its peak memory is its own: on a GPU the peak of
``torch.cuda.max_memory_allocated`` above what the loaded model holds, on a CPU the rise of the
resident set's high-water mark (VmHWM, reset before the call). The ratios are the last lines.

    PYTHONPATH=.:tests:benchmarks OMP_NUM_THREADS=1 python benchmarks/bench_grad_sign.py --model tiny
    python benchmarks/bench_grad_sign.py [--model default] [--samples 64] [--grad-batches 4] [--out FILE]

``--model tiny`` is the character-level test model (tests/tiny_lm.py), a smoke run; ``default`` is
plop's embedded SmolLM2-135M.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench_diagnose import questions, reset_peak, rss_mib

VARIANTS = ("nfn", "grad-sign", "train-step")
HERE = Path(__file__).resolve().parent


def load(name: str):
    import torch

    if name == "tiny":
        from tiny_lm import make_model, make_tokenizer

        return make_model().eval(), make_tokenizer(), torch.device("cpu")
    from plop.model.loading import load_model

    model, tokenizer, _ = load_model(None if name == "default" else name)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return model.eval(), tokenizer, next(model.parameters()).device


def train_step(model, batch, device):
    """One LoRA step on ``batch``, ready to call: wrapping the model and building the optimizer
    are set-up, not timed."""
    import torch
    from peft import LoraConfig, get_peft_model

    from plop.measure.grad_sign import causal_lm_loss

    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        causal_lm_loss(peft_model, batch, device).backward()
        optimizer.step()

    return step


def run_variant(variant: str, args) -> dict:
    """One variant, timed, in this process (the parent starts one process per variant)."""
    import torch

    from plop import diagnose
    from plop.measure.batching import text_batches
    from plop.measure.grad_sign import grad_sign_scores
    from plop.model.layers import find_linear_modules

    model, tokenizer, device = load(args.model)
    texts, _ = questions(args.samples, with_answers=True)
    batches = list(text_batches(texts, tokenizer, max_length=args.max_length,
                                batch_tokens=args.batch_size * args.max_length))
    step = train_step(model, batches[0], device) if variant == "train-step" else None
    cuda = device.type == "cuda"
    base = torch.cuda.memory_allocated(device) if cuda else rss_mib("VmHWM")
    torch.cuda.reset_peak_memory_stats(device) if cuda else reset_peak()
    start = time.perf_counter()
    if variant == "nfn":
        diagnose(model, texts, tokenizer, samples=len(texts), max_length=args.max_length, batch_size=args.batch_size)
    elif variant == "grad-sign":
        grad_sign_scores(model, find_linear_modules(model), batches, args.grad_batches, 0, device)
    else:
        step()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if cuda else rss_mib("VmHWM") - base
    return {"variant": variant, "seconds": round(seconds, 3), "peak_extra_mib": round(peak, 1),
            "device": str(device), "batches": len(batches), "rows": len(texts)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="tiny, default (SmolLM2-135M) or a hub id / directory")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-batches", type=int, default=4)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return
    rows = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant]
        rows[variant] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(json.dumps(rows[variant]))
    for other in ("nfn", "train-step"):
        print(f"grad-sign/{other}: time {rows['grad-sign']['seconds'] / rows[other]['seconds']:.2f}x, "
              f"peak memory {rows['grad-sign']['peak_extra_mib'] / max(rows[other]['peak_extra_mib'], 0.1):.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
