"""``show``, ``diff`` and ``export``: the commands that read saved reports (and never torch)."""

from __future__ import annotations

import json
import os
import sys
import warnings

from ..placement import LoraSettings
from ..stacks import FORMATS
from ..utils.fsio import check_destination
from ..utils.untrusted import plain_safe, terminal_safe
from .options import Options, build, command

SHOW_EXAMPLES = """examples:
  plop show report.json
  plop show report.json --plot nfn.png
  plop show report.json --html report.html   # one self-contained page
"""
DIFF_EXAMPLES = """examples:
  plop diff math.json code.json
  plop diff a.json b.json --plot diff.png
  plop diff a.json b.json --json | jq .recommendation_changed
"""
EXPORT_EXAMPLES = """examples:
  plop export report.json --peft lora-config/          # adapter_config.json for LoraConfig.from_pretrained
  plop export report.json --to axolotl --out lora.yml
  plop export report.json --to llama-factory --merge my_sft.yaml   # only the LoRA keys change
  plop export report.json --to torchtune --rank 8 --loraplus-ratio 16
  plop export report.json --to unsloth                   # a Python snippet on stdout
"""


def register(sub) -> None:
    p = command(sub, "show", "render a saved report", epilog=SHOW_EXAMPLES)
    p.add_argument("report")
    p.add_argument("--plot", default=None, metavar="FILE", help="write a PNG: NFN heatmap and ranking")
    p.add_argument("--html", default=None, metavar="OUT.html",
                   help="write one self-contained HTML page (tables, heatmap, every export with a copy button)")
    p.set_defaults(func=show)

    p = command(sub, "diff", "compare two reports: how placement moves between tasks or checkpoints",
                epilog=DIFF_EXAMPLES)
    p.add_argument("a", help="report A")
    p.add_argument("b", help="report B")
    p.add_argument("--plot", default=None, metavar="FILE", help="write a PNG: per-type NFN in A and B")
    p.add_argument("--json", action="store_true", help="print the diff as JSON on stdout (table goes to stderr)")
    p.set_defaults(func=diff)

    p = command(sub, "export", "write the recommendation for PEFT or another fine-tuning stack",
                epilog=EXPORT_EXAMPLES)
    p.add_argument("report")
    p.add_argument("--to", default="peft", choices=list(FORMATS), help="the stack to write a config for")
    p.add_argument("--out", default=None, metavar="PATH", help="file or folder to write (default: stdout)")
    p.add_argument("--merge", default=None, metavar="CONFIG",
                   help="write the LoRA keys into this existing config, keeping every other key "
                        "(in place unless --out is given)")
    p.add_argument("--peft", default=None, metavar="DIR", help="same as --to peft --out DIR")
    # rsLoRA is left out: only the PEFT stack writes it
    Options(p).add(LoraSettings, skip=("use_rslora",), defaults={"r": None},
                   helps={"r": "LoRA rank (default: the report's)",
                          "loraplus_ratio": "LoRA+ learning-rate ratio of B over A, for stacks with a key for it"})
    p.set_defaults(func=export)


def show(args) -> int:
    from rich.console import Console

    from ..ranking.report import Report

    for path in (args.plot, args.html):
        check_destination(path)
    report = Report.load(args.report)
    Console().print(report)
    if args.plot:
        report.plot(args.plot)
        print(plain_safe(f"plot written to {args.plot}"))
    if args.html:
        from ..stacks import snippets
        from ..ranking.html_report import write_html

        write_html(report, args.html, exports=snippets(report))
        print(plain_safe(f"HTML report written to {args.html}"))
    return 0


def diff(args) -> int:
    from rich.console import Console

    from ..ranking.diff import diff_reports
    from ..ranking.render import diff_table, plot_diff
    from ..ranking.report import Report

    check_destination(args.plot)
    d = diff_reports(Report.load(args.a), Report.load(args.b), label_a=args.a, label_b=args.b)
    if args.json:
        sys.stdout.write(json.dumps(d.to_dict(), indent=2) + "\n")
    Console(stderr=args.json).print(diff_table(d))
    if args.plot:
        plot_diff(d, args.plot)
        Console(stderr=args.json).print(f"plot written to [bold]{terminal_safe(args.plot)}[/]")
    return 0


def export(args) -> int:
    from ..stacks import export as export_to
    from ..stacks import write_export
    from ..ranking.report import Report

    fmt, out = ("peft", os.path.join(args.peft, "")) if args.peft else (args.to, args.out)  # a folder
    report = Report.load(args.report)
    settings = build(LoraSettings, args, r=args.r or report.recommendation.rank)
    result = export_to(report, fmt, settings)
    for warning in result.warnings:
        warnings.warn(warning, stacklevel=1)
    if not result.exact:
        warnings.warn(f"{fmt} cannot express the recommendation exactly: wrote its closest superset", stacklevel=1)
    from ..audit.verify import export_difference  # what the written config trains, by PEFT's matcher

    if (difference := export_difference(result.text, fmt, report)) is not None:
        warnings.warn(difference, stacklevel=1)
    text, path = write_export(result, out, args.merge)
    if path is None:
        sys.stdout.write(text)
    else:
        print(plain_safe(f"{fmt} config written to {path} (target_modules={report.recommendation.target_modules!r})"))
    return 0
