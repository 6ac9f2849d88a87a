"""``plop diagnose``: one no-grad pass over a data sample, NFN per linear module, ranked by type."""

from __future__ import annotations

import sys

from ..config import DiagnoseConfig, StrategyFlags
from ..utils.fsio import check_destination
from ..utils.untrusted import terminal_safe
from .inputs import is_main, load_model_and_data, model_command
from .options import build, values

EXAMPLES = """examples:
  plop diagnose                                   # embedded SmolLM2-135M on the demo data
  plop diagnose ./my-model --data train.jsonl --template "Q: {question}\\nA: {answer}"
  plop diagnose meta-llama/Llama-3.1-8B --data chats.jsonl --chat --dtype bfloat16 --top-k 2
  plop diagnose --until-stable --samples 1000 --budget 2000000 --rank 8 --out report.json --plot nfn.png
  plop diagnose --allocate                        # ranks per type under the top-3 budget (rank_pattern)
  plop diagnose --json | jq .recommendation.target_modules
"""


def register(sub) -> None:
    p = model_command(sub, "diagnose", "rank module types by NFN and recommend target_modules",
                      "One no-grad pass over a data sample: NFN per linear module, ranked by type.", EXAMPLES,
                      big_models=True).add(DiagnoseConfig, StrategyFlags).parser
    o = p.add_argument_group("output")
    o.add_argument("--out", default="report.json", metavar="FILE", help="where to write the JSON report ('' to skip)")
    o.add_argument("--json", action="store_true", help="print the report JSON to stdout (table goes to stderr)")
    o.add_argument("--plot", default=None, metavar="FILE", help="also write a PNG: NFN heatmap and ranking")
    p.set_defaults(func=run)


def run(args) -> int:
    # bad values fail before the slow loading
    config = DiagnoseConfig(**values(DiagnoseConfig, args), strategy=build(StrategyFlags, args).strategy())
    for path in (args.out, args.plot):
        check_destination(path)
    # until_stable reads at most --samples rows: fewer in the file is no surprise worth a warning
    model, tokenizer, model_id, examples, info = load_model_and_data(args, config.samples,
                                                                     warn_short=not config.until_stable)
    from rich.console import Console

    from ..diagnosis import diagnose

    report = diagnose(model, examples, tokenizer, config, model_id=model_id, data_info=info, progress=True)
    if not is_main():  # data-parallel: every process holds the report, rank 0 writes it
        return 0
    console = Console(stderr=args.json)
    console.print(report)
    for path, write, what in ((args.out, report.save, "report"), (args.plot, report.plot, "plot")):
        if path:
            write(path)
            console.print(f"{what} written to [bold]{terminal_safe(path)}[/]")
    if args.json:
        sys.stdout.write(report.to_json() + "\n")
    return 0
