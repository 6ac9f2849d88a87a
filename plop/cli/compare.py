"""``plop compare``: fine-tune several placements at one parameter budget."""

from __future__ import annotations

from ..finetune.config import CompareConfig, TrainConfig
from ..utils.fsio import check_destination
from ..utils.untrusted import plain_safe
from .inputs import is_main, load_model_and_data, model_command
from .options import values
from .train import checked_config, say_diagnosed

EXAMPLES = """examples:
  plop compare --report report.json --steps 50
  plop compare --method grpo --reward rewards.py:exact_match --placements recommended,all-linear,mlp --rank 1
  plop compare ./my-model --data gsm8k.jsonl --report report.json --placements recommended,qv,all-linear \\
      --seeds 0,1,2 --steps 200 --out results.json
"""


def register(sub) -> None:
    options = model_command(sub, "compare", "fine-tune several placements at one parameter budget",
                            "Each placement gets the rank that matches the recommendation's trainable parameters at "
                            "--rank (within 10%) and the same lora_alpha; same data, steps and seeds, and with "
                            "--lr-grid each its own best learning rate.", EXAMPLES, train_config=TrainConfig,
                            train_skip=("epochs", "output_dir", "resume", "overwrite", "adapter_name", "report_to"),
                            train_defaults={"dropout": 0.0})
    options.add(CompareConfig)
    p = options.parser
    p.add_argument("--report", help="report of this model (default: diagnose on the same data first)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, metavar="FILE", help="write the results as JSON")
    o.add_argument("--plot", default=None, metavar="FILE",
                   help="write a PNG: eval loss (GRPO: held-out reward) per placement (spread over seeds) and trainable parameters")
    o.add_argument("--output-dir", default=None, help="keep every run's adapter here (default: discarded)")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console

    from ..finetune.compare import compare
    from ..finetune.run_report import own_report
    from ..ranking.report import Report

    config = checked_config(args)
    for path in (args.out, args.plot):
        check_destination(path)
    report = Report.load(args.report) if args.report else None
    model, tokenizer, model_id, examples, info = load_model_and_data(args, args.samples)
    if report is None:  # diagnosed on the same data, as plop train does; kept with the adapters when they are
        report = own_report(model, tokenizer, examples, config, args.output_dir, model_id=model_id, data_info=info)
        say_diagnosed(report)
    result = compare(model, tokenizer, examples, report, rank=config.lora.r, config=config, output_dir=args.output_dir,
                     progress=True, **values(CompareConfig, args))
    if not is_main():
        return 0
    Console().print(result)
    for path, write, what in ((args.out, result.save, "results"), (args.plot, result.plot, "plot")):
        if path:
            write(path)
            print(plain_safe(f"{what} written to {path}"))
    return 0
