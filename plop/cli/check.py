"""``plop check``: audit a LoRA config of any stack against the model it will train (no weights read)."""

from __future__ import annotations

import json

from ..config import names, targets
from ..placement import LoraSettings
from ..stacks import READABLE
from ..utils.untrusted import plain_safe
from .options import Options, command

EPILOG = """\
CONFIG is a PEFT adapter folder or adapter_config.json, an axolotl, LLaMA-Factory, TRL, torchtune
or mlx-lm YAML, a plop export, or an unsloth script (parsed, never run); or give the targets inline.
MODEL is a model folder, its config.json or a .gguf (default: the base model the config names, when local).
A torchtune recipe needs none: its model._component_ builder defines the model (torchtune 0.6.1's builders).

exit status: 0 no error-level finding, 3 error-level findings (the run would train something else
than the config says), 2 unreadable input, 1 a bug.

examples:
  plop check lora-cfg/ ./Llama-3.1-8B
  plop check axolotl.yml ./Qwen3-30B-A3B/config.json --json
  plop check lora.yaml ./model --report report.json --html check.html
  plop check --target-modules q_proj,v_proj --rank-pattern v_proj=32 ./model
"""


def register(sub) -> None:
    p = command(sub, "check", "audit any LoRA config against the model: what it trains, what it misses", epilog=EPILOG)
    p.add_argument("config", nargs="?", help="config file or PEFT adapter folder (omit with --target-modules)")
    p.add_argument("model", nargs="?", help="model folder, config.json or .gguf")
    p.add_argument("--flavour", choices=READABLE,
                   help="the stack that reads CONFIG (default: detected from its keys)")
    p.add_argument("--target-modules", type=targets, metavar="A,B",
                   help="inline: comma-separated suffixes, or one PEFT regex")
    p.add_argument("--target-parameters", type=names, metavar="A,B",
                   help="inline: comma-separated 3-D expert weights (PEFT target_parameters)")
    p.add_argument("--rank-pattern", type=names, metavar="KEY=RANK,KEY=RANK", help="inline: PEFT rank_pattern")
    Options(p).add(LoraSettings, only=("r",), helps={"r": "inline: LoRA rank"})
    p.add_argument("--report", help="a plop report of this model: weigh the placement by NFN")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--html", metavar="OUT.html", help="write one self-contained HTML page")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..audit import check, inline_spec
    from ..audit.render import render_text, write_html

    inline = args.target_modules is not None or args.target_parameters is not None
    if inline:  # with inline targets the one positional is the model
        config = inline_spec(args.target_modules, args.target_parameters, args.rank_pattern, args.r)
        model = args.model or args.config
    else:
        config, model = args.config, args.model
        if config is None:
            from ..errors import ConfigError

            raise ConfigError("give a CONFIG file, or --target-modules / --target-parameters and a MODEL")
    result = check(config, model, report=args.report, flavour=args.flavour)
    print(json.dumps(result.to_dict(), indent=2) if args.json else render_text(result))
    if args.html:
        write_html(result, args.html)
        print(plain_safe(f"HTML written to {args.html}"))
    return result.exit_code
