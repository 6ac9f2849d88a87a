"""The ``plop`` command line: a thin layer over the Python API.

Every user error ends as one line on stderr and exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from . import __version__
from .errors import PlopError

EXIT_USAGE = 2


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {number}")
    return number


def _samples(value: str) -> int | str:
    return value if value == "auto" else _positive(value)


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return number


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    """Usage errors in plop's one-line form (argparse's default adds the whole usage block)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"plop: error: {message} (see '{self.prog} --help')\n")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="hub id, local model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")


def add_data_args(p: argparse.ArgumentParser, samples_default: int | None) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="JSON/JSONL/CSV/Parquet/text file or folder, or a hub dataset "
                                               "name (default: plop's built-in demo data)")
    g.add_argument("--split", default="train", help="split of a hub dataset or folder")
    g.add_argument("--config", default=None, help="configuration of a hub dataset")
    how = g.add_mutually_exclusive_group()
    how.add_argument("--text-field", help="take the text from this one field")
    how.add_argument("--template", help='format several fields, e.g. "Q: {question}\\nA: {answer}"')
    how.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to prompt/response")
    g.add_argument("--prompt-field", help="field holding the prompt (default: detected)")
    g.add_argument("--response-field", help="field holding the response (default: detected)")
    g.add_argument("--samples", type=_samples if samples_default is not None else _positive, default=samples_default,
                   help="rows to sample" + (" ('auto': stop once the recommendation is stable)"
                                            if samples_default is not None else " (default: all)"))
    g.add_argument("--max-length", type=_positive, default=256, help="tokens per sample")
    g.add_argument("--batch-size", type=_positive, default=8)
    g.add_argument("--seed", type=int, default=0)


def model_command(sub, name: str, help: str, epilog: str, description: str,
                  samples_default: int | None = None) -> argparse.ArgumentParser:
    """A subcommand that loads a model and reads data: the shared options, examples in --help."""
    p = sub.add_parser(name, help=help, formatter_class=_Formatter, epilog=epilog, description=description)
    add_model_args(p)
    add_data_args(p, samples_default=samples_default)
    return p


def text_format(args):
    from .data import TextFormat

    template = args.template.encode().decode("unicode_escape") if args.template else None
    return TextFormat(text_field=args.text_field, template=template, chat=args.chat,
                      prompt_field=args.prompt_field, response_field=args.response_field)


def load_model_and_data(args, samples):
    """The model, its tokenizer, its id, and the examples with their provenance."""
    from rich.console import Console

    from .data import load_examples
    from .models import load_model

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the spinner says it once, instead of three bars per load
    try:
        with Console(stderr=True).status("loading model (a .gguf file is converted once, then cached)"):
            model, tokenizer, model_id = load_model(args.model, dtype=args.dtype, device=args.device,
                                                    trust_remote_code=args.trust_remote_code)
    finally:
        hf_logging.enable_progress_bar()
    examples, info = load_examples(args.data, samples=samples, seed=args.seed, text_format=text_format(args),
                                   tokenizer=tokenizer, split=args.split, config=args.config)
    return model, tokenizer, model_id, examples, info


# -- diagnose ----------------------------------------------------------------------------------
AUTO_SAMPLE_CAP = 1024


def cmd_diagnose(args) -> int:
    from rich.console import Console

    from .diagnose import DiagnoseConfig, diagnose

    if args.out and Path(args.out).is_dir():  # before the slow loading, not after
        raise PlopError(f"--out {args.out} is a directory", "name a .json file")
    strategy = "budget" if args.budget is not None else ("per_layer" if args.per_layer else "top_k")
    config = DiagnoseConfig(samples=args.samples, max_length=args.max_length, batch_size=args.batch_size,
                            seed=args.seed, strategy=strategy, top_k=args.top_k or 3, budget=args.budget,
                            rank=args.rank, estimator=args.estimator, include_head=args.include_head)
    wanted = AUTO_SAMPLE_CAP if args.samples == "auto" else args.samples
    model, tokenizer, model_id, examples, info = load_model_and_data(args, wanted)
    report = diagnose(model, [e.text for e in examples], tokenizer, config, model_id=model_id, data_info=info,
                      progress=True)
    console = Console(stderr=args.json)
    console.print(report)
    if args.out:
        report.save(args.out)
        console.print(f"report written to [bold]{args.out}[/]")
    if args.plot:
        report.plot(args.plot)
        console.print(f"plot written to [bold]{args.plot}[/]")
    if args.json:
        sys.stdout.write(report.to_json() + "\n")
    return 0


def cmd_show(args) -> int:
    from rich.console import Console

    from .report import Report

    report = Report.load(args.report)
    Console().print(report)
    if args.plot:
        report.plot(args.plot)
        print(f"plot written to {args.plot}")
    return 0


def cmd_export(args) -> int:
    from .report import Report

    report = Report.load(args.report)
    config = report.to_peft_config(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout, use_dora=args.dora)
    config.base_model_name_or_path = report.model["id"]
    Path(args.peft).mkdir(parents=True, exist_ok=True)
    config.save_pretrained(args.peft)
    print(f"LoraConfig written to {Path(args.peft) / 'adapter_config.json'} "
          f"(target_modules={report.recommendation.target_modules!r}, r={config.r})")
    return 0


# -- train, compare, adapters -----------------------------------------------------------------
TRAIN_REPORT = "plop_report.json"  # the diagnosis a train run made for itself, reused by --resume


def _train_config(args, **fields):
    """A TrainConfig from the shared options; built before any loading, so bad values fail at once."""
    from .trainer import TrainConfig

    return TrainConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout, lr=args.lr,
                       loraplus_ratio=args.loraplus_ratio, dora=args.dora, steps=args.steps, batch_size=args.batch_size,
                       grad_accum=args.grad_accum, max_length=args.max_length, eval_fraction=args.eval_fraction,
                       seed=args.seed, **fields)


def _diagnosed(args, model, tokenizer, model_id, examples, info):
    """Diagnose on the training data itself when no report was given."""
    from rich.console import Console

    from .diagnose import DiagnoseConfig, diagnose

    config = DiagnoseConfig(max_length=args.max_length, batch_size=args.batch_size, seed=args.seed, rank=args.rank)
    report = diagnose(model, [e.text for e in examples], tokenizer, config, model_id=model_id, data_info=info,
                      progress=True)
    Console(stderr=True).print(f"diagnosed: LoRA goes on [bold]{', '.join(report.recommendation.types)}[/] "
                               f"(lowest NFN of {len(report.types)} module types)")
    return report


def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _seeds(value: str) -> list[int]:
    try:
        return [int(v) for v in _names(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {value!r}") from None


def cmd_train(args) -> int:
    from rich.console import Console

    from .report import Report
    from .trainer import TrainingInterrupted, check_output_dir, train

    config = _train_config(args, epochs=args.epochs, output_dir=args.output_dir, resume=args.resume,
                           overwrite=args.overwrite, adapter_name=args.adapter_name)
    run = check_output_dir(config)  # an occupied directory fails before the slow loading
    report = Report.load(args.report) if args.report else None
    model, tokenizer, model_id, examples, info = load_model_and_data(args, args.samples)
    if report is None and args.target_modules is None and args.placement in (None, "recommended"):
        saved = run / TRAIN_REPORT
        if args.resume and saved.is_file():  # the run being resumed must keep its placement
            report = Report.load(saved)
        else:
            report = _diagnosed(args, model, tokenizer, model_id, examples, info)
            report.save(saved)
    try:
        result = train(model, tokenizer, examples, config, report=report, target_modules=args.target_modules,
                       placement=args.placement, model_id=model_id, data_info=info, progress=True)
    except TrainingInterrupted as stop:
        print(f"plop: {stop}", file=sys.stderr)
        return 130
    s = result.summary
    method = "DoRA" if s["dora"] else "LoRA"
    method += f"+ (ratio {s['loraplus_ratio']:g})" if s["loraplus_ratio"] != 1 else ""
    before, after = s["eval_before"], s["eval_after"]
    evals = (f"; eval loss {before['loss']:.4f} -> {after['loss']:.4f} (ppl {before['ppl']:.2f} -> {after['ppl']:.2f})"
             if before and after else "")
    Console().print(
        f"trained {method} rank {s['rank']} on [bold]{', '.join(s['types'])}[/] ({s['placement']}): "
        f"{s['trainable_params']:,} trainable parameters\n"
        f"{s['steps']} steps, {s['seconds_per_step'] or 0:.3f} s/step{evals}\n"
        f"adapter written to [bold]{result.adapter_path}[/] (PeftModel.from_pretrained(base, path) loads it)"
    )
    return 0


def cmd_compare(args) -> int:
    from rich.console import Console

    from .compare import compare
    from .report import Report

    config = _train_config(args)
    report = Report.load(args.report) if args.report else None
    model, tokenizer, model_id, examples, info = load_model_and_data(args, args.samples)
    report = report or _diagnosed(args, model, tokenizer, model_id, examples, info)
    result = compare(model, tokenizer, examples, report, placements=args.placements, seeds=args.seeds,
                     rank=args.rank, config=config, output_dir=args.output_dir, progress=True)
    Console().print(result)
    if args.out:
        result.save(args.out)
        print(f"results written to {args.out}")
    if args.plot:
        result.plot(args.plot)
        print(f"plot written to {args.plot}")
    return 0


def cmd_adapters_list(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .adapters import list_adapters

    rows = list_adapters(args.dir)
    if not rows:
        print(f"no adapters in {args.dir}")
        return 0
    table = Table(title=f"adapters in {args.dir}", caption="eval loss before and after training")
    for column in ("name", "placement", "targets", "rank", "steps", "before", "after"):
        # a narrow terminal wraps the long column only
        table.add_column(column, no_wrap=column != "targets", min_width=16 if column == "targets" else None)
    for r in rows:
        targets = r["target_modules"] if isinstance(r["target_modules"], str) else ", ".join(r["target_modules"] or [])
        table.add_row(r["name"], r["placement"] or "-", targets, f"{r['rank']}" + (" DoRA" if r["dora"] else ""),
                      *(f"{r[k]:.4f}" if isinstance(r[k], float) else str(r[k] or "-")
                        for k in ("steps", "eval_loss_before", "eval_loss_after")))
    Console().print(table)
    return 0


def cmd_adapters_merge(args) -> int:
    from .adapters import list_adapters, merge_adapter
    from .models import load_model

    rows = {r["name"]: r for r in list_adapters(args.dir)}
    if args.name not in rows:
        raise PlopError(f"no adapter named {args.name!r} in {args.dir}", f"available: {', '.join(rows) or 'none'}")
    base_id = args.model or rows[args.name]["base_model"]
    if not base_id:
        raise PlopError("the adapter does not say which base model it was trained on", "pass --model")
    model, tokenizer, _ = load_model(base_id, dtype=args.dtype, device="cpu")
    out = merge_adapter(model, args.dir, args.name, args.out, tokenizer=tokenizer)
    print(f"merged adapter {args.name!r} into {base_id}; model written to {out}")
    return 0


# -- parser ------------------------------------------------------------------------------------
DIAGNOSE_EXAMPLES = """examples:
  plop diagnose                                   # embedded SmolLM2-135M on the demo data
  plop diagnose ./my-model --data train.jsonl --template "Q: {question}\\nA: {answer}"
  plop diagnose meta-llama/Llama-3.1-8B --data chats.jsonl --chat --dtype bfloat16 --top-k 2
  plop diagnose --samples auto --budget 2000000 --rank 8 --out report.json --plot nfn.png
  plop diagnose --json | jq .recommendation.target_modules
"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="plop", formatter_class=_Formatter,
        description="Where to put LoRA adapters, measured before you fine-tune (PLoP, arXiv 2506.20629).",
        epilog="run 'plop COMMAND --help' for a command's options and examples",
    )
    parser.add_argument("--version", action="version", version=f"plop {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = model_command(sub, "diagnose", "rank module types by NFN and recommend target_modules", DIAGNOSE_EXAMPLES,
                      "One no-grad pass over a data sample: NFN per linear module, ranked by type.",
                      samples_default=100)
    g = p.add_argument_group("recommendation")
    how = g.add_mutually_exclusive_group()
    how.add_argument("--top-k", type=_positive, default=None, help="the k lowest-NFN types (default 3)")
    how.add_argument("--budget", type=_positive, default=None, help="trainable LoRA parameters at --rank")
    how.add_argument("--per-layer", action="store_true", help="pick individual modules (k per layer on average)")
    g.add_argument("--rank", type=_positive, default=16, help="LoRA rank the costs are computed at")
    g.add_argument("--estimator", default="closed_form", choices=["closed_form", "monte_carlo"])
    g.add_argument("--include-head", action="store_true", help="also diagnose the output head")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="report.json", help="where to write the JSON report ('' to skip)")
    o.add_argument("--json", action="store_true", help="print the report JSON to stdout (table goes to stderr)")
    o.add_argument("--plot", default=None, help="also write a PNG: NFN heatmap and ranking")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("show", help="render a saved report", formatter_class=_Formatter,
                       epilog="examples:\n  plop show report.json\n  plop show report.json --plot nfn.png")
    p.add_argument("report")
    p.add_argument("--plot", default=None, help="write a PNG: NFN heatmap and ranking")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("export", help="write the recommended LoraConfig in PEFT's format", formatter_class=_Formatter,
                       epilog="examples:\n  plop export report.json --peft lora-config/\n"
                              "  python -c \"from peft import LoraConfig; print(LoraConfig.from_pretrained('lora-config'))\"")
    p.add_argument("report")
    p.add_argument("--peft", required=True, metavar="DIR", help="directory for adapter_config.json")
    p.add_argument("--rank", type=_positive, default=None, help="LoRA rank (default: the report's)")
    p.add_argument("--alpha", type=_positive, default=None, help="lora_alpha (default: 2 x rank)")
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--dora", action="store_true", help="use DoRA")
    p.set_defaults(func=cmd_export)

    add_train_parsers(sub)
    return parser


TRAIN_EXAMPLES = """examples:
  plop train --steps 100                          # embedded SmolLM2-135M, demo data: diagnose, then train there
  plop train ./my-model --data train.jsonl --report report.json --output-dir runs/math
  plop train --placement all-linear --rank 8 --loraplus-ratio 1 --epochs 2
  plop train --target-modules q_proj,v_proj --dora --lr 1e-4
  plop train --output-dir runs/math --steps 200 --resume     # continue from the last checkpoint
  plop train --output-dir runs/tasks --adapter-name math     # a named adapter in runs/tasks/math/
  accelerate launch -m plop.cli train ./my-model --data train.jsonl   # several GPUs, DeepSpeed, FSDP
"""

COMPARE_EXAMPLES = """examples:
  plop compare --report report.json --steps 50
  plop compare ./my-model --data gsm8k.jsonl --report report.json --placements recommended,qv,all-linear \\
      --seeds 0,1,2 --steps 200 --out results.json
"""

ADAPTERS_EXAMPLES = """examples:
  plop adapters list runs/tasks
  plop adapters merge runs/tasks math --out merged-math/
"""


def _add_lora_args(p: argparse.ArgumentParser) -> None:
    # rank and lr are checked by TrainConfig, so a bad value is one clear line, not a usage dump
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--rank", type=int, default=16, help="LoRA rank")
    g.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: 2 x rank)")
    g.add_argument("--dropout", type=float, default=0.05)
    g.add_argument("--lr", type=float, default=2e-4, help="learning rate (of the A matrices under LoRA+)")
    g.add_argument("--loraplus-ratio", type=float, default=16.0,
                   help="LoRA+: the B matrices' learning rate over the A matrices' (1: plain LoRA)")
    g.add_argument("--dora", action="store_true", help="DoRA: also learn each output's magnitude")
    g.add_argument("--steps", type=_positive, default=None, help="optimizer steps (default: one epoch)")
    g.add_argument("--grad-accum", type=_positive, default=1, help="batches per optimizer step")
    g.add_argument("--eval-fraction", type=float, default=0.1, help="share of the data held out for the eval loss")


def add_train_parsers(sub) -> None:
    """``train``, ``compare`` and ``adapters``: the bundled fine-tuning."""
    from .trainer import PLACEMENT_CHOICES

    p = model_command(sub, "train", "fine-tune LoRA / LoRA+ / DoRA where the diagnosis says", TRAIN_EXAMPLES,
                      "Fine-tune adapters with transformers' Trainer. Without --report, --target-modules or "
                      "--placement, the model is diagnosed on the same data first.")
    where = p.add_argument_group("where the adapters go").add_mutually_exclusive_group()
    where.add_argument("--report", help="a report from plop diagnose: train on its recommendation")
    where.add_argument("--target-modules", type=_names, metavar="A,B", help="module types or names, e.g. q_proj,v_proj")
    where.add_argument("--placement", choices=PLACEMENT_CHOICES, help="a named placement")
    _add_lora_args(p)
    p.add_argument("--epochs", type=_positive_float, default=None, help="epochs, instead of --steps")
    o = p.add_argument_group("output")
    o.add_argument("--output-dir", default="plop-adapter", help="adapter, checkpoints and plop_train_summary.json")
    o.add_argument("--adapter-name", default="default", help="a named adapter goes to OUTPUT_DIR/NAME/")
    again = o.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output dir")
    again.add_argument("--overwrite", action="store_true", help="replace a previous run in the output dir")
    p.set_defaults(func=cmd_train)

    from .compare import COMPARE_PLACEMENTS

    p = model_command(sub, "compare", "fine-tune several placements at one parameter budget", COMPARE_EXAMPLES,
                      "Each placement gets the rank that matches the recommendation's trainable parameters at "
                      "--rank (within 10%); same data, steps, seed and learning rate.")
    p.add_argument("--report", help="report of this model (default: diagnose on the same data first)")
    p.add_argument("--placements", type=_names, default=None, metavar="A,B",
                   help=f"from {', '.join(COMPARE_PLACEMENTS)} (default: all)")
    p.add_argument("--seeds", type=_seeds, default=[0], metavar="0,1,2", help="one run per placement and seed")
    _add_lora_args(p)
    p.add_argument("--out", default=None, help="write the results as JSON")
    p.add_argument("--plot", default=None, help="write a PNG: eval loss per placement (spread over seeds) and "
                                                "trainable parameters")
    p.add_argument("--output-dir", default=None, help="keep every run's adapter here (default: discarded)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("adapters", help="list or merge task adapters trained into one directory",
                       formatter_class=_Formatter, epilog=ADAPTERS_EXAMPLES)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = actions.add_parser("list", help="name, placement, rank and eval loss of each adapter",
                           formatter_class=_Formatter, epilog=ADAPTERS_EXAMPLES)
    q.add_argument("dir")
    q.set_defaults(func=cmd_adapters_list)
    q = actions.add_parser("merge", help="merge one adapter into its base model and save that",
                           formatter_class=_Formatter, epilog=ADAPTERS_EXAMPLES)
    q.add_argument("dir")
    q.add_argument("name", help="adapter name ('default' for the one at the directory's root)")
    q.add_argument("--out", required=True, metavar="DIR", help="where to save the merged model")
    q.add_argument("--model", default=None, help="base model (default: the one recorded in the adapter)")
    q.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    q.set_defaults(func=cmd_adapters_merge)


def _friendly(error: BaseException) -> str | None:
    """The one-line message for an error the user can act on, or None for a bug."""
    import torch

    from .report import ReportError

    if isinstance(error, (PlopError, ReportError)):
        return str(error)
    if isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and ("out of memory" in str(error) or "can't allocate memory" in str(error))
    ):
        return "out of memory: try a smaller --batch-size or --max-length (or --dtype bfloat16)"
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return f"{error.strerror}: {error.filename}"
    if isinstance(error, ValueError):  # the API's own input checks
        return str(error)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.debug:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.formatwarning = lambda msg, *a, **k: f"plop: warning: {msg}\n"
            return args.func(args)
    except KeyboardInterrupt:
        print("plop: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - turned into a one-line message or re-raised
        message = _friendly(error)
        if message is None or args.debug:
            raise
        print(f"plop: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
