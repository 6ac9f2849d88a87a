"""The ``plop`` command line: a thin layer over the Python API.

Every user error ends as one line on stderr and exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

from .config import DEVICES, DTYPES, ESTIMATORS, QUANTIZATIONS, TOKEN_SCOPES, DiagnoseConfig
from .errors import PlopError
from .exports import FORMATS
from .finetune.config import REPORT_TO, TrainConfig
from .fsio import atomic_write
from .placement import COMPARE_DEFAULT, COMPARE_PLACEMENTS, TRAIN_PLACEMENTS, ranks_text
from .untrusted import plain_safe, terminal_safe
from .version import __version__

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


def _default(cls, name: str):
    """A dataclass field's default: the CLI shows and uses the API's own defaults."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        # "(default: None)" says nothing: such options explain their absence in their own help
        return (action.help or "") if action.default is None else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Usage errors in plop's one-line form (argparse's default adds the whole usage block)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"plop: error: {message} (see '{self.prog} --help')\n")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="hub id, local model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--quantize", default="none", choices=QUANTIZATIONS,
                   help="load the base as QLoRA trains it: bitsandbytes 8-bit, or 4-bit NF4 (CPU or GPU)")
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
    g.add_argument("--max-length", type=_positive, default=_default(DiagnoseConfig, "max_length"),
                   help="tokens per sample")
    g.add_argument("--batch-size", type=_positive, default=_default(DiagnoseConfig, "batch_size"))
    g.add_argument("--seed", type=int, default=_default(DiagnoseConfig, "seed"))


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


def _world():
    """This process's place in a ``torchrun`` / ``accelerate launch`` job, joining its process
    group on first use (a single process when not launched so)."""
    from .distributed import init_from_env

    return init_from_env()


def load_model_and_data(args, samples):
    """The model, its tokenizer, its id, and the examples with their provenance (on every
    process of a launched job: the seeded sampling gives all of them the same rows)."""
    from rich.console import Console

    from .data import load_examples
    from .models import load_model

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the spinner says it once, instead of three bars per load
    world = _world()
    try:
        status = "loading model (a .gguf file is converted once, then cached)"
        with Console(stderr=True, quiet=not world.is_main).status(status):
            model, tokenizer, model_id = load_model(
                args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                max_memory=getattr(args, "max_memory", None), offload_dir=getattr(args, "offload_dir", None),
                quantize=args.quantize, shard=getattr(args, "shard", False))
    finally:
        hf_logging.enable_progress_bar()
    examples, info = load_examples(args.data, samples=samples, seed=args.seed, text_format=text_format(args),
                                   tokenizer=tokenizer, split=args.split, config=args.config)
    return model, tokenizer, model_id, examples, info


# -- diagnose ----------------------------------------------------------------------------------
AUTO_SAMPLE_CAP = 1024


def _strategy(args) -> str:
    if args.allocate is not None:
        return "allocate"
    return "budget" if args.budget is not None else ("per_layer" if args.per_layer else "top_k")


def cmd_diagnose(args) -> int:
    from rich.console import Console

    from .diagnosis import diagnose

    if args.out and Path(args.out).is_dir():  # before the slow loading, not after
        raise PlopError(f"--out {args.out} is a directory", "name a .json file")
    config = DiagnoseConfig(samples=args.samples, max_length=args.max_length, batch_size=args.batch_size,
                            batch_tokens=args.batch_tokens, tokens=args.tokens, seed=args.seed,
                            strategy=_strategy(args), top_k=args.top_k,
                            budget=args.budget if args.allocate is None else args.allocate or None,
                            rank=args.rank, estimator=args.estimator, include_head=args.include_head,
                            weight_scores=args.weight_scores, shard=args.shard)
    wanted = AUTO_SAMPLE_CAP if args.samples == "auto" else args.samples
    model, tokenizer, model_id, examples, info = load_model_and_data(args, wanted)
    report = diagnose(model, examples, tokenizer, config, model_id=model_id, data_info=info,
                      progress=True)
    if not _world().is_main:  # data-parallel: every process holds the report, rank 0 writes it
        return 0
    console = Console(stderr=args.json)
    console.print(report)
    if args.out:
        report.save(args.out)
        console.print(f"report written to [bold]{terminal_safe(args.out)}[/]")
    if args.plot:
        report.plot(args.plot)
        console.print(f"plot written to [bold]{terminal_safe(args.plot)}[/]")
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
        print(plain_safe(f"plot written to {args.plot}"))
    if args.html:
        from .exports import export
        from .html_report import default_exports, write_html

        # every stack's snippet gets a copy button; peft's own is the LoraConfig line, which needs no torch
        snippets = {**default_exports(report), **{f: export(report, f).text for f in FORMATS if f != "peft"}}
        write_html(report, args.html, exports=snippets)
        print(plain_safe(f"HTML report written to {args.html}"))
    return 0


def cmd_diff(args) -> int:
    from rich.console import Console

    from .diff import diff_reports
    from .render import diff_table, plot_diff
    from .report import Report

    d = diff_reports(Report.load(args.a), Report.load(args.b), label_a=args.a, label_b=args.b)
    if args.json:
        sys.stdout.write(json.dumps(d.to_dict(), indent=2) + "\n")
    Console(stderr=args.json).print(diff_table(d))
    if args.plot:
        plot_diff(d, args.plot)
        Console(stderr=args.json).print(f"plot written to [bold]{terminal_safe(args.plot)}[/]")
    return 0


def cmd_export(args) -> int:
    from .exports import export, merge_into
    from .report import Report

    report = Report.load(args.report)
    fmt, out = ("peft", args.peft) if args.peft else (args.to, args.out)
    result = export(report, fmt, rank=args.rank, alpha=args.alpha, dropout=args.dropout, dora=args.dora,
                    loraplus_ratio=args.loraplus_ratio)
    for warning in result.warnings:
        warnings.warn(warning, stacklevel=1)
    if not result.exact:
        warnings.warn(f"{fmt} cannot express the recommendation exactly: wrote its closest superset", stacklevel=1)
    text = merge_into(Path(args.merge).read_text(encoding="utf-8"), result) if args.merge else result.text
    out = out or args.merge
    if out is None:
        sys.stdout.write(text)
        return 0
    path = Path(out)
    if args.peft or path.is_dir() or out.endswith(os.sep):  # a folder gets the stack's own file name
        path = path / result.filename
    atomic_write(path, text)
    print(plain_safe(f"{fmt} config written to {path} (target_modules={report.recommendation.target_modules!r})"))
    return 0


# -- train, compare, adapters -----------------------------------------------------------------
TRAIN_REPORT = "plop_report.json"  # the diagnosis a train run made for itself, reused by --resume
REMEASURE_ROWS = 100  # rows re-diagnosed after a run placed without a report (plop diagnose's default)


def _train_config(args, **fields):
    """A TrainConfig from the shared options; built before any loading, so bad values fail at once."""
    return TrainConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout, lr=args.lr,
                       loraplus_ratio=args.loraplus_ratio, dora=args.dora, steps=args.steps, batch_size=args.batch_size,
                       grad_accum=args.grad_accum, max_length=args.max_length, eval_fraction=args.eval_fraction,
                       seed=args.seed, **fields)


def _diagnosed(args, model, tokenizer, model_id, examples, info):
    """Diagnose on the training data itself when no report was given."""
    from rich.console import Console

    from .diagnosis import diagnose

    config = DiagnoseConfig(max_length=args.max_length, batch_size=args.batch_size, seed=args.seed, rank=args.rank)
    report = diagnose(model, examples, tokenizer, config, model_id=model_id, data_info=info,
                      progress=True)  # data-parallel in a launched job: every process gets the same report
    types = terminal_safe(", ".join(report.recommendation.types))
    Console(stderr=True, quiet=not _world().is_main).print(f"diagnosed: LoRA goes on [bold]{types}[/] "
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

    from .finetune.trainer import TrainingInterrupted, check_output_dir, needs_diagnosis, train
    from .render import nfn_change_table
    from .report import Report

    config = _train_config(args, epochs=args.epochs, output_dir=args.output_dir, resume=args.resume,
                           overwrite=args.overwrite, adapter_name=args.adapter_name, report_to=args.report_to)
    run = check_output_dir(config)  # an occupied directory fails before the slow loading
    report = Report.load(args.report) if args.report else None
    model, tokenizer, model_id, examples, info = load_model_and_data(args, args.samples)
    if needs_diagnosis(report, args.target_modules, args.placement):
        saved = run / TRAIN_REPORT
        if args.resume and saved.is_file():  # the run being resumed must keep its placement
            report = Report.load(saved)
        else:
            report = _diagnosed(args, model, tokenizer, model_id, examples, info)
            if _world().is_main:
                report.save(saved)
    # re-measured after training on the rows the placement came from: what the fine-tune changed, where
    rows = report.data["samples"] if report is not None else REMEASURE_ROWS
    try:
        result = train(model, tokenizer, examples, config, report=report, target_modules=args.target_modules,
                       placement=args.placement, model_id=model_id, data_info=info, progress=True,
                       remeasure=[e.text for e in examples[:rows]])
    except TrainingInterrupted as stop:
        print(plain_safe(f"plop: {stop}"), file=sys.stderr)
        return 130
    if not _world().is_main:  # rank 0 wrote the adapter and the summary, and says so
        return 0
    s = result.summary
    method = "DoRA" if s["dora"] else "LoRA"
    method += f"+ (ratio {s['loraplus_ratio']:g})" if s["loraplus_ratio"] != 1 else ""
    before, after = s["eval_before"], s["eval_after"]
    evals = (f"; eval loss {before['loss']:.4f} -> {after['loss']:.4f} (ppl {before['ppl']:.2f} -> {after['ppl']:.2f})"
             if before and after else "")
    processes = f" on {s['world_size']} processes (global batch {s['global_batch']})" if s["world_size"] > 1 else ""
    Console().print(
        f"trained {method} {ranks_text(s['rank'], s['rank_pattern'])} on [bold]{terminal_safe(', '.join(s['types']))}[/] "
        f"({terminal_safe(s['placement'])}): "
        f"{s['trainable_params']:,} trainable parameters\n"
        f"{s['steps']} steps{processes}, {s['seconds_per_step'] or 0:.3f} s/step{evals}\n"
        f"adapter written to [bold]{terminal_safe(str(result.adapter_path))}[/] "
        "(PeftModel.from_pretrained(base, path) loads it)"
    )
    if s["nfn_change"] is not None:  # not re-measured where the weights were partitioned (ZeRO-3)
        Console().print(nfn_change_table(s["nfn_change"]))
    return 0


def cmd_compare(args) -> int:
    from rich.console import Console

    from .finetune.compare import compare
    from .report import Report

    config = _train_config(args)
    report = Report.load(args.report) if args.report else None
    model, tokenizer, model_id, examples, info = load_model_and_data(args, args.samples)
    report = report or _diagnosed(args, model, tokenizer, model_id, examples, info)
    result = compare(model, tokenizer, examples, report, placements=args.placements, seeds=args.seeds,
                     rank=args.rank, config=config, output_dir=args.output_dir, progress=True)
    if not _world().is_main:
        return 0
    Console().print(result)
    if args.out:
        result.save(args.out)
        print(plain_safe(f"results written to {args.out}"))
    if args.plot:
        result.plot(args.plot)
        print(plain_safe(f"plot written to {args.plot}"))
    return 0


def cmd_adapters_list(args) -> int:
    from rich.console import Console

    from .finetune.adapters import list_adapters
    from .render import adapters_table

    rows = list_adapters(args.dir)
    if not rows:
        print(plain_safe(f"no adapters in {args.dir}"))
        return 0
    Console().print(adapters_table(args.dir, rows))
    return 0


def cmd_adapters_merge(args) -> int:
    from .finetune.adapters import list_adapters, merge_adapter
    from .models import load_model

    rows = {r["name"]: r for r in list_adapters(args.dir)}
    if args.name not in rows:
        raise PlopError(f"no adapter named {args.name!r} in {args.dir}", f"available: {', '.join(rows) or 'none'}")
    base_id = args.model or rows[args.name]["base_model"]
    if not base_id:
        raise PlopError("the adapter does not say which base model it was trained on", "pass --model")
    model, tokenizer, _ = load_model(base_id, dtype=args.dtype, device="cpu")
    out = merge_adapter(model, args.dir, args.name, args.out, tokenizer=tokenizer)
    print(plain_safe(f"merged adapter {args.name!r} into {base_id}; model written to {out}"))
    return 0


# -- parser ------------------------------------------------------------------------------------
EXPORT_EXAMPLES = """examples:
  plop export report.json --peft lora-config/          # adapter_config.json for LoraConfig.from_pretrained
  plop export report.json --to axolotl --out lora.yml
  plop export report.json --to llama-factory --merge my_sft.yaml   # only the LoRA keys change
  plop export report.json --to torchtune --rank 8 --loraplus-ratio 16
  plop export report.json --to unsloth                   # a Python snippet on stdout
"""
DIAGNOSE_EXAMPLES = """examples:
  plop diagnose                                   # embedded SmolLM2-135M on the demo data
  plop diagnose ./my-model --data train.jsonl --template "Q: {question}\\nA: {answer}"
  plop diagnose meta-llama/Llama-3.1-8B --data chats.jsonl --chat --dtype bfloat16 --top-k 2
  plop diagnose --samples auto --budget 2000000 --rank 8 --out report.json --plot nfn.png
  plop diagnose --allocate                        # ranks per type under the top-3 budget (rank_pattern)
  plop diagnose --json | jq .recommendation.target_modules
"""


def add_diagnose_parser(sub) -> None:
    """``diagnose``: its recommendation, output and big-model options."""
    p = model_command(sub, "diagnose", "rank module types by NFN and recommend target_modules", DIAGNOSE_EXAMPLES,
                      "One no-grad pass over a data sample: NFN per linear module, ranked by type.",
                      samples_default=100)
    g = p.add_argument_group("recommendation")
    how = g.add_mutually_exclusive_group()
    how.add_argument("--top-k", type=_positive, default=_default(DiagnoseConfig, "top_k"),
                     help="the k lowest-NFN types")
    how.add_argument("--budget", type=_positive, default=None, help="trainable LoRA parameters at --rank")
    how.add_argument("--per-layer", action="store_true", help="pick individual modules (k per layer on average)")
    how.add_argument("--allocate", nargs="?", type=_positive, const=0, default=None, metavar="BUDGET",
                     help="a LoRA rank per type, larger where NFN is lower, under BUDGET parameters "
                          "(default: what the top-k placement costs at --rank); PEFT rank_pattern")
    g.add_argument("--rank", type=_positive, default=_default(DiagnoseConfig, "rank"),
                   help="LoRA rank the costs are computed at")
    g.add_argument("--batch-tokens", type=_positive, default=None, metavar="N",
                   help="tokens per batch: rows are batched by length, rows x longest <= N "
                        "(default: --batch-size x --max-length, more on a GPU with memory to spare)")
    g.add_argument("--tokens", default=_default(DiagnoseConfig, "tokens"), choices=TOKEN_SCOPES,
                   help="which tokens of prompt/response data to score (the model reads them all); "
                        "'response': what supervised fine-tuning trains on")
    g.add_argument("--estimator", default=_default(DiagnoseConfig, "estimator"), choices=ESTIMATORS)
    g.add_argument("--include-head", action="store_true", help="also diagnose the output head")
    g.add_argument("--weight-scores", action="store_true",
                   help="also score every weight without data (KappaTune condition number, Spectrum SNR)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="report.json", help="where to write the JSON report ('' to skip)")
    o.add_argument("--json", action="store_true", help="print the report JSON to stdout (table goes to stderr)")
    o.add_argument("--plot", default=None, help="also write a PNG: NFN heatmap and ranking")
    p.set_defaults(func=cmd_diagnose)
    b = p.add_argument_group("models bigger than memory (one process)")
    b.add_argument("--max-memory", default=None, metavar="SIZE",
                   help='weights each GPU and the CPU may hold, e.g. "2GiB"; the rest stays on disk')
    b.add_argument("--offload-dir", default=None, metavar="DIR",
                   help="where weights that do not fit go (safetensors checkpoints are read in place without it)")
    p.add_argument("--shard", action="store_true", help="under torchrun/accelerate launch: each process holds "
                   "1/N of the weights (FSDP2), not a whole copy; same report")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="plop", formatter_class=_Formatter,
        description="Where to put LoRA adapters, measured before you fine-tune (PLoP, arXiv 2506.20629).",
        epilog="run 'plop COMMAND --help' for a command's options and examples",
    )
    parser.add_argument("--version", action="version", version=f"plop {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    add_diagnose_parser(sub)

    add_report_parsers(sub)
    add_train_parsers(sub)
    return parser


def add_report_parsers(sub) -> None:
    """``show``, ``diff`` and ``export``: the commands that read saved reports (and never torch)."""
    p = sub.add_parser("show", help="render a saved report", formatter_class=_Formatter,
                       epilog="examples:\n  plop show report.json\n  plop show report.json --plot nfn.png\n"
                              "  plop show report.json --html report.html   # one self-contained page")
    p.add_argument("report")
    p.add_argument("--plot", default=None, help="write a PNG: NFN heatmap and ranking")
    p.add_argument("--html", default=None, metavar="OUT.html",
                   help="write one self-contained HTML page (tables, heatmap, every export with a copy button)")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("diff", help="compare two reports: how placement moves between tasks or checkpoints",
                       formatter_class=_Formatter,
                       epilog="examples:\n  plop diff math.json code.json\n  plop diff a.json b.json --plot diff.png\n"
                              "  plop diff a.json b.json --json | jq .recommendation_changed")
    p.add_argument("a", help="report A")
    p.add_argument("b", help="report B")
    p.add_argument("--plot", default=None, help="write a PNG: per-type NFN in A and B")
    p.add_argument("--json", action="store_true", help="print the diff as JSON on stdout (table goes to stderr)")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("export", help="write the recommendation for PEFT or another fine-tuning stack",
                       formatter_class=_Formatter, epilog=EXPORT_EXAMPLES)
    p.add_argument("report")
    p.add_argument("--to", default="peft", choices=list(FORMATS), help="the stack to write a config for")
    p.add_argument("--out", default=None, metavar="PATH", help="file or folder to write (default: stdout)")
    p.add_argument("--merge", default=None, metavar="CONFIG",
                   help="write the LoRA keys into this existing config, keeping every other key "
                        "(in place unless --out is given)")
    p.add_argument("--peft", default=None, metavar="DIR", help="same as --to peft --out DIR")
    p.add_argument("--rank", type=_positive, default=None, help="LoRA rank (default: the report's)")
    p.add_argument("--alpha", type=_positive, default=None, help="lora_alpha (default: 2 x rank)")
    p.add_argument("--dropout", type=float, default=_default(TrainConfig, "dropout"))
    p.add_argument("--dora", action="store_true", help="use DoRA")
    p.add_argument("--loraplus-ratio", type=float, default=None,
                   help="LoRA+ learning-rate ratio of B over A, for stacks with a key for it")
    p.set_defaults(func=cmd_export)



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
    g.add_argument("--rank", type=int, default=_default(TrainConfig, "rank"), help="LoRA rank")
    g.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: 2 x rank)")
    g.add_argument("--dropout", type=float, default=_default(TrainConfig, "dropout"))
    g.add_argument("--lr", type=float, default=_default(TrainConfig, "lr"),
                   help="learning rate (of the A matrices under LoRA+)")
    g.add_argument("--loraplus-ratio", type=float, default=_default(TrainConfig, "loraplus_ratio"),
                   help="LoRA+: the B matrices' learning rate over the A matrices' (1: plain LoRA)")
    g.add_argument("--dora", action="store_true", help="DoRA: also learn each output's magnitude")
    g.add_argument("--steps", type=_positive, default=None, help="optimizer steps (default: one epoch)")
    g.add_argument("--grad-accum", type=_positive, default=_default(TrainConfig, "grad_accum"),
                   help="batches per optimizer step")
    g.add_argument("--eval-fraction", type=float, default=_default(TrainConfig, "eval_fraction"),
                   help="share of the data held out for the eval loss")


def add_train_parsers(sub) -> None:
    """``train``, ``compare`` and ``adapters``: the bundled fine-tuning."""
    p = model_command(sub, "train", "fine-tune LoRA / LoRA+ / DoRA where the diagnosis says", TRAIN_EXAMPLES,
                      "Fine-tune adapters with transformers' Trainer. Without --report, --target-modules or "
                      "--placement, the model is diagnosed on the same data first.")
    where = p.add_argument_group("where the adapters go").add_mutually_exclusive_group()
    where.add_argument("--report", help="a report from plop diagnose: train on its recommendation")
    where.add_argument("--target-modules", type=_names, metavar="A,B", help="module types or names, e.g. q_proj,v_proj")
    where.add_argument("--placement", choices=TRAIN_PLACEMENTS, help="a named placement")
    _add_lora_args(p)
    p.add_argument("--epochs", type=_positive_float, default=None, help="epochs, instead of --steps")
    p.add_argument("--report-to", default=_default(TrainConfig, "report_to"), choices=REPORT_TO,
                   help="where the Trainer logs; tensorboard also gets the placement and NFN heatmap at step 0")
    o = p.add_argument_group("output")
    o.add_argument("--output-dir", default=_default(TrainConfig, "output_dir"),
                   help="adapter, checkpoints and plop_train_summary.json")
    o.add_argument("--adapter-name", default=_default(TrainConfig, "adapter_name"),
                   help="a named adapter goes to OUTPUT_DIR/NAME/")
    again = o.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output dir")
    again.add_argument("--overwrite", action="store_true", help="replace a previous run in the output dir")
    p.set_defaults(func=cmd_train)

    p = model_command(sub, "compare", "fine-tune several placements at one parameter budget", COMPARE_EXAMPLES,
                      "Each placement gets the rank that matches the recommendation's trainable parameters at "
                      "--rank (within 10%); same data, steps, seed and learning rate.")
    p.add_argument("--report", help="report of this model (default: diagnose on the same data first)")
    p.add_argument("--placements", type=_names, default=None, metavar="A,B",
                   help=f"from {', '.join(COMPARE_PLACEMENTS)} (default: {', '.join(COMPARE_DEFAULT)})")
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
    q.add_argument("--dtype", default="auto", choices=DTYPES)
    q.set_defaults(func=cmd_adapters_merge)


def _friendly(error: BaseException) -> str | None:
    """The one-line message for an error the user can act on, or None for a bug."""
    if isinstance(error, PlopError):
        return str(error)
    torch = sys.modules.get("torch")  # never imported: the error cannot be torch's
    if (torch is not None and isinstance(error, torch.OutOfMemoryError)) or (
        isinstance(error, RuntimeError) and ("out of memory" in str(error) or "can't allocate memory" in str(error))
    ):
        return ("out of memory: try a smaller --batch-tokens (diagnose), --batch-size or --max-length "
                "(or --dtype bfloat16)")
    if torch is not None and isinstance(error, torch.distributed.DistError):  # a peer died or hung
        return f"another process of this job stopped or timed out: {str(error).splitlines()[0]}"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    return None


def _fail(message: str) -> int:
    """One line on stderr, exit code 2.

    A failed process of a launched job leaves at once, with SIGTERM held off while it says its
    line: the launcher SIGTERMs the other processes as soon as one exits, and tearing down a
    process group whose peer has left can abort the process (SIGABRT) after its line, so either
    would turn its exit code 2 into a signal."""
    line = plain_safe(f"plop: error: {message}")
    distributed = sys.modules.get("plop.distributed")
    if distributed is not None and distributed.world().parallel:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        print(line, file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_USAGE)
    print(line, file=sys.stderr, flush=True)
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        args = build_parser().parse_args(argv)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if not args.debug:  # read by transformers when (and only if) a command imports it
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
            # bitsandbytes warns at import on CPUs without its optional kernels: not the user's concern
            logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            # libraries' deprecations (torch.jit under bitsandbytes, ...) are for their authors, not plop's users
            for category in (DeprecationWarning, FutureWarning):
                warnings.filterwarnings("ignore", category=category)
            warnings.formatwarning = lambda msg, *a, **k: plain_safe(f"plop: warning: {msg}") + "\n"
            return args.func(args)
    except KeyboardInterrupt:
        return interrupted()
    except Exception as error:  # noqa: BLE001 - turned into a one-line message or re-raised
        message = _friendly(error)
        if message is None or (args is not None and args.debug):
            raise
        return _fail(message)
    finally:
        if "plop.distributed" in sys.modules:  # only a command that loaded a model joined a group
            sys.modules["plop.distributed"].finish()


def interrupted() -> int:
    print("plop: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
