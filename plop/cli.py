"""The ``plop`` command line: a thin layer over the Python API.

Every user error ends as one line on stderr and exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
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

    if args.budget is not None and args.top_k is not None:
        raise PlopError("--budget and --top-k are two different strategies", "pass one of them")
    strategy = "budget" if args.budget is not None else ("per_layer" if args.per_layer else "top_k")
    config = DiagnoseConfig(samples=args.samples, max_length=args.max_length, batch_size=args.batch_size,
                            seed=args.seed, strategy=strategy, top_k=args.top_k or 3, budget=args.budget,
                            rank=args.rank, estimator=args.estimator, include_head=args.include_head)
    wanted = AUTO_SAMPLE_CAP if args.samples == "auto" else args.samples
    model, tokenizer, model_id, examples, info = load_model_and_data(args, wanted)
    if args.out and Path(args.out).is_dir():
        raise PlopError(f"--out {args.out} is a directory", "name a .json file")
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


# -- parser ------------------------------------------------------------------------------------
DIAGNOSE_EXAMPLES = """examples:
  plop diagnose                                   # embedded SmolLM2-135M on the demo data
  plop diagnose ./my-model --data train.jsonl --template "Q: {question}\\nA: {answer}"
  plop diagnose meta-llama/Llama-3.1-8B --data chats.jsonl --chat --dtype bfloat16 --top-k 2
  plop diagnose --samples auto --budget 2000000 --rank 8 --out report.json --plot nfn.png
  plop diagnose --json | jq .recommendation.target_modules
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plop", formatter_class=_Formatter,
        description="Where to put LoRA adapters, measured before you fine-tune (PLoP, arXiv 2506.20629).",
        epilog="run 'plop COMMAND --help' for a command's options and examples",
    )
    parser.add_argument("--version", action="version", version=f"plop {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("diagnose", help="rank module types by NFN and recommend target_modules",
                       formatter_class=_Formatter, epilog=DIAGNOSE_EXAMPLES,
                       description="One no-grad pass over a data sample: NFN per linear module, ranked by type.")
    add_model_args(p)
    add_data_args(p, samples_default=100)
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

    return parser


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
