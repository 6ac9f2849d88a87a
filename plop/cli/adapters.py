"""``plop adapters list|merge``: the task adapters trained into one directory."""

from __future__ import annotations

from ..config import DTYPES
from ..errors import PlopError
from ..utils.untrusted import plain_safe
from .options import command

EXAMPLES = """examples:
  plop adapters list runs/tasks
  plop adapters merge runs/tasks math --output-dir merged-math/
"""


def register(sub) -> None:
    p = command(sub, "adapters", "list or merge task adapters trained into one directory", epilog=EXAMPLES)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = command(actions, "list", "name, placement, rank and eval loss of each adapter", epilog=EXAMPLES)
    q.add_argument("dir")
    q.set_defaults(func=list_)
    q = command(actions, "merge", "merge one adapter into its base model and save that", epilog=EXAMPLES)
    q.add_argument("dir")
    q.add_argument("name", help="adapter name ('default' for the one at the directory's root)")
    # a folder, as train's --output-dir; --out (its old name) stays as an alias: --out names a file elsewhere
    q.add_argument("--output-dir", "--out", dest="output_dir", required=True, metavar="DIR",
                   help="where to save the merged model")
    q.add_argument("--model", default=None, help="base model (default: the one recorded in the adapter)")
    q.add_argument("--dtype", default="auto", choices=DTYPES)
    q.set_defaults(func=merge)


def list_(args) -> int:
    from rich.console import Console

    from ..finetune.adapters import list_adapters
    from ..ranking.render import adapters_table

    rows = list_adapters(args.dir)
    if not rows:
        print(plain_safe(f"no adapters in {args.dir}"))
        return 0
    Console().print(adapters_table(args.dir, rows))
    return 0


def merge(args) -> int:
    from ..finetune.adapters import list_adapters, merge_adapter
    from ..model.loading import load_model

    rows = {r["name"]: r for r in list_adapters(args.dir)}
    if args.name not in rows:
        raise PlopError(f"no adapter named {args.name!r} in {args.dir}", f"available: {', '.join(rows) or 'none'}")
    base_id = args.model or rows[args.name]["base_model"]
    if not base_id:
        raise PlopError("the adapter does not say which base model it was trained on", "pass --model")
    model, tokenizer, _ = load_model(base_id, dtype=args.dtype, device="cpu")
    out = merge_adapter(model, args.dir, args.name, args.output_dir, tokenizer=tokenizer)
    print(plain_safe(f"merged adapter {args.name!r} into {base_id}; model written to {out}"))
    return 0
