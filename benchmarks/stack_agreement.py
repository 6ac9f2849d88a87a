"""Does ``plop check`` name what a stack's own code builds? For every published config of
tests/corpus/<stack>/ (index.json: the config, its base model's config.json and their sources),
the stack's own build and plop check side by side: the modules that get LoRA and the trainable
parameter count, or who refuses the config and why. One section per stack (``SECTIONS``: the
function that gives the stack's own build of one entry); add a stack by adding its section.

    python benchmarks/stack_agreement.py --stack mlx_lm     # needs the stack-mlx extra

Writes benchmarks/results/stack_agreement_<stack>.json.

mlx_lm: mlx_lm/lora.py's run up to training, on the CPU: CONFIG_DEFAULTS under the config (the
config's lora_parameters replaces the defaults' whole mapping), mlx-lm's own model of
config.json (random weights, never evaluated: mlx is lazy, so even 235B parameters cost nothing),
train's num_layers check, then linear_to_lora_layers and the trainable count.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "corpus"
RESULTS = ROOT / "benchmarks" / "results"


def mlx_lm_build(config: Path, model: Path) -> dict:
    """What mlx-lm trains for ``config`` on ``model``: its wrapped modules and trainable count, or its refusal."""
    from mlx.utils import tree_flatten
    from mlx_lm.lora import CONFIG_DEFAULTS
    from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import _get_classes

    args = {**CONFIG_DEFAULTS, **{k: v for k, v in yaml.safe_load(config.read_text()).items() if v is not None}}
    model_config = json.loads(model.read_text())
    try:
        model_cls, args_cls = _get_classes(model_config)
        built = model_cls(args_cls.from_dict(model_config))
        built.freeze()
        if args["num_layers"] > len(built.layers):
            raise ValueError(f"Requested to train {args['num_layers']} layers but the model only has "
                             f"{len(built.layers)} layers.")
        linear_to_lora_layers(built, args["num_layers"], args["lora_parameters"],
                              use_dora=args["fine_tune_type"] == "dora")
    except (ValueError, KeyError, TypeError) as e:
        return {"refused": f"{type(e).__name__}: {e}"}
    kinds = (LoRALinear, LoRASwitchLinear, LoRAEmbedding, DoRALinear, DoRAEmbedding)
    return {"modules": sorted(n for n, m in built.named_modules() if isinstance(m, kinds)),
            "trainable": sum(v.size for _, v in tree_flatten(built.trainable_parameters()))}


# stack -> (plop check's flavour, the stack's own build of one corpus entry)
SECTIONS: dict[str, tuple[str, Callable[[Path, Path], dict]]] = {
    "mlx_lm": ("mlx-lm", mlx_lm_build),
}


def plop_build(config: Path, model: Path, flavour: str) -> dict:
    from plop.audit import check
    from plop.errors import PlopError

    try:
        result = check(config, model, flavour=flavour)
    except PlopError as e:
        return {"exit": 2, "refused": str(e)}
    errors = [f.message for f in result.errors]
    refused = next((f.message for f in result.errors if f.code.endswith("refuses")), None)
    return {"exit": result.exit_code, "modules": result.stack_modules or result.modules, "trainable": result.trainable,
            "errors": errors, **({"refused": refused} if refused else {})}


def compare(own: dict, ours: dict) -> tuple[bool, str]:
    """Agreement, and in words what differs (or what both did)."""
    if "refused" in own or "refused" in ours:
        both = "refused" in own and "refused" in ours
        return both, ("both refuse" if both else
                      f"stack: {own.get('refused', 'builds')}; plop: {ours.get('refused', 'builds')}")
    extra, missing = sorted(set(ours["modules"]) - set(own["modules"])), sorted(set(own["modules"]) - set(ours["modules"]))
    same = not extra and not missing and own["trainable"] == ours["trainable"]
    return same, ("same modules and count" if same else
                  f"plop names {len(extra)} more, {len(missing)} fewer modules; trainable {ours['trainable']:,} "
                  f"vs {own['trainable']:,}")


def run(stack: str) -> dict:
    flavour, own_build = SECTIONS[stack]
    rows = []
    for entry in json.loads((CORPUS / stack / "index.json").read_text()):
        config, model = CORPUS / stack / entry["config"], (CORPUS / stack / entry["model"]).resolve()
        start = time.perf_counter()
        own = own_build(config, model)
        middle = time.perf_counter()
        ours = plop_build(config, model, flavour)
        agree, how = compare(own, ours)
        rows.append({"name": entry["name"], "agree": agree, "how": how, "plop_exit": ours["exit"],
                     "trainable": ours.get("trainable"), "stack_trainable": own.get("trainable"),
                     "modules": len(ours.get("modules", [])), "plop_errors": ours.get("errors", []),
                     "refused": {"stack": own.get("refused"), "plop": ours.get("refused")},
                     "seconds": {"stack": round(middle - start, 3), "plop": round(time.perf_counter() - middle, 3)}})
        print(f"{'agree' if agree else 'DIFFER':7} exit {ours['exit']}  {entry['name']}: {how}")
    return {"stack": stack, "configs": len(rows), "agree": sum(r["agree"] for r in rows),
            "disagreements": [{"name": r["name"], "why": r["how"]} for r in rows if not r["agree"]], "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", required=True, choices=sorted(SECTIONS))
    stack = parser.parse_args().stack
    summary = run(stack)
    out = RESULTS / f"stack_agreement_{stack}.json"
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{summary['agree']}/{summary['configs']} agree -> {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
