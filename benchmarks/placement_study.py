"""Placement study: does the NFN recommendation fine-tune better than the usual guesses?

SmolLM2-135M-Instruct (plop's embedded default) on GSM8K (../shared/data/gsm8k): diagnose on train
rows, fine-tune every placement of ``plop compare`` at a matched trainable-parameter budget (the
recommendation's at rank 8; each placement's rank chosen to match it within 10 %) on the same train
rows, steps, learning rate and seeds, and evaluate the loss on the response tokens of held-out test
rows before and after. Question = prompt, answer = response (loss on the answer only).

Writes benchmarks/results/placement_study.json and placement_study.png and prints a Markdown table
for benchmarks/README.md. Calibrated to finish within about 45 minutes on 2 CPU cores:

    python benchmarks/placement_study.py [--steps 32] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GSM8K = HERE.parent.parent / "shared" / "data" / "gsm8k"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--diagnose-samples", type=int, default=128)
    parser.add_argument("--eval-samples", type=int, default=40)
    parser.add_argument("--placements", default=None, help="comma-separated (default: all of plop compare's)")
    args = parser.parse_args()
    if not (GSM8K / "train.jsonl").is_file():
        raise SystemExit(f"GSM8K not found at {GSM8K}: this study needs ../shared/data/gsm8k")

    import torch

    torch.set_num_threads(2)
    import plop
    from plop.data import load_examples
    from plop.models import load_model

    start = time.perf_counter()
    model, tokenizer, model_id = load_model(None, device="cpu")
    seeds = [int(s) for s in args.seeds.split(",")]
    n_train = args.steps * args.batch_size
    train, train_info = load_examples(str(GSM8K / "train.jsonl"), samples=max(n_train, args.diagnose_samples), seed=0,
                                      tokenizer=tokenizer)
    test, test_info = load_examples(str(GSM8K / "test.jsonl"), samples=args.eval_samples, seed=0, tokenizer=tokenizer)
    report = plop.diagnose(model, [e.text for e in train[: args.diagnose_samples]], tokenizer, model_id=model_id,
                           data_info={**train_info, "indices": train_info["indices"][: args.diagnose_samples]},
                           max_length=256, rank=args.rank, progress=True)
    report.save(HERE / "results" / "placement_study_report.json")
    print(f"recommended: {report.recommendation.types} (stable: {report.recommendation.stable})")

    comparison = plop.compare(
        model, tokenizer, train[:n_train], report, rank=args.rank, seeds=seeds, steps=args.steps,
        batch_size=args.batch_size, max_length=args.max_length, lr=args.lr, eval_examples=test,
        placements=args.placements.split(",") if args.placements else None, progress=True,
    )
    elapsed = time.perf_counter() - start
    result = comparison.to_dict()
    result["runs"] = [{**row, "steps": args.steps} for row in result.pop("rows")]
    result.update(model=model_id, train=train_info["source"], test=test_info["source"], train_rows=n_train,
                  eval_rows=len(test), recommended=report.recommendation.types, seconds_total=elapsed,
                  command="python benchmarks/placement_study.py " + " ".join(
                      f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None))
    out = HERE / "results" / "placement_study.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    comparison.plot(HERE / "results" / "placement_study.png")

    print(f"\n| placement | types | rank | trainable params | eval loss before | eval loss after (mean ± std, "
          f"{len(seeds)} seeds) | s/step |\n|---|---|---|---|---|---|---|")
    for row in sorted(result["aggregate"], key=lambda r: r["eval_loss_after_mean"]):
        print(f"| {row['placement']} | {', '.join(row['types'])} | {row['rank']} | {row['trainable_params']:,} | "
              f"{row['eval_loss_before_mean']:.4f} | {row['eval_loss_after_mean']:.4f} ± "
              f"{row['eval_loss_after_std']:.4f} | {row['seconds_per_step_mean']:.2f} |")
    print(f"\nwritten {out} and placement_study.png in {elapsed / 60:.1f} min")


if __name__ == "__main__":
    main()
