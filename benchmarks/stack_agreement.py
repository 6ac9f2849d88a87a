"""Does ``plop check`` name what a stack's own code builds? For every published config of
tests/corpus/<stack>/ (index.json: the config, its base model's config.json and their sources),
the stack's own build and plop check side by side: the modules that get LoRA and the trainable
parameter count, or who refuses the config and why. One section per stack (``SECTIONS``: the
function that gives the stack's own build of one entry); add a stack by adding its section.

    python benchmarks/stack_agreement.py --stack llama_factory   # needs the stack-llamafactory extra

Writes benchmarks/results/stack_agreement_<stack>.json.

llama_factory: llamafactory 0.9.5's own FinetuningArguments parse the YAML, and its own
find_all_linear_modules / patch_target_modules (the v1 form: its plugin's _find_all_linear_modules)
pick the targets on the meta model; PEFT's get_peft_model with the LoraConfig adapter.py builds
gives the modules and the trainable count.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import importlib.util
import json
import os
import sys
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "corpus"
RESULTS = ROOT / "benchmarks" / "results"


# -- llama_factory ---------------------------------------------------------------------------------
@contextmanager
def llama_factory_code() -> Iterator[types.SimpleNamespace]:
    """llamafactory's visual.py, misc.py and finetuning_args.py under their own names, without the
    package ``__init__`` files (they import its whole training stack); unloaded afterwards."""
    found = importlib.util.find_spec("llamafactory")
    if found is None:
        raise ModuleNotFoundError("llamafactory is not installed (make test-stacks installs it)")
    root = Path(found.submodule_search_locations[0])
    os.environ.setdefault("LLAMAFACTORY_VERBOSITY", "WARN")  # its INFO lines, once per call, would bury the table
    before = set(sys.modules)
    for package in ("llamafactory", "llamafactory.extras", "llamafactory.hparams", "llamafactory.model",
                    "llamafactory.model.model_utils"):
        if package not in sys.modules:
            stub = types.ModuleType(package)
            stub.__path__ = [str(root.joinpath(*package.split(".")[1:]))]
            stub.__spec__ = importlib.util.spec_from_loader(package, None, is_package=True)
            stub.__spec__.submodule_search_locations = stub.__path__  # a nested call finds the same files
            sys.modules[package] = stub
    try:
        yield types.SimpleNamespace(
            root=root, visual=importlib.import_module("llamafactory.model.model_utils.visual"),
            misc=importlib.import_module("llamafactory.model.model_utils.misc"),
            args=importlib.import_module("llamafactory.hparams.finetuning_args"),
            plugin_find_all=_plugin_find_all(root / "v1" / "plugins" / "model_plugins" / "peft.py"))
    finally:
        for name in set(sys.modules) - before:
            if name.partition(".")[0] == "llamafactory":  # what it imported (transformers' models) stays
                del sys.modules[name]


def _plugin_find_all(path: Path) -> Callable:
    """The v1 plugin's own _find_all_linear_modules, compiled from its source (its module imports
    the whole v1 engine); it needs nothing but the model."""
    node = next(n for n in ast.parse(path.read_text()).body
                if isinstance(n, ast.FunctionDef) and n.name == "_find_all_linear_modules")
    namespace: dict = {}
    exec(compile(ast.Module([node], []), str(path), "exec"), namespace)
    return namespace["_find_all_linear_modules"]


def llama_factory_lora(lf: types.SimpleNamespace, model, config: dict) -> dict:
    """The LoraConfig arguments adapter.py _setup_lora_tuning (or the v1 get_lora_model) hands PEFT."""
    plugin = config.get("peft_config")
    if isinstance(plugin, dict):
        targets = plugin.get("target_modules", "all")
        targets = lf.plugin_find_all(model) if targets == "all" else [targets] if isinstance(targets, str) else targets
        return {"r": plugin.get("r", 8), "lora_alpha": plugin.get("lora_alpha", 16),
                "lora_dropout": plugin.get("lora_dropout", 0.05), "target_modules": targets,
                "modules_to_save": plugin.get("modules_to_save")}
    fields = {f.name for f in dataclasses.fields(lf.args.FinetuningArguments)}
    args = lf.args.FinetuningArguments(**{k: v for k, v in config.items() if k in fields})
    targets = args.lora_target
    if len(targets) == 1 and targets[0] == "all":
        targets = lf.misc.find_all_linear_modules(model, args.freeze_vision_tower)
    return {"r": args.lora_rank, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
            "target_modules": lf.visual.patch_target_modules(model, args, targets),
            "modules_to_save": args.additional_target}


def llama_factory_build(config: Path, model: Path) -> dict:
    """What LLaMA-Factory trains for ``config`` on ``model``: its wrapped modules and trainable
    count, or why it trains no new adapter of a tree plop can see."""
    from plop.audit.meta import meta_model
    from plop.audit.resolve import wrap

    data = yaml.safe_load(config.read_text())
    settings = data.get("peft_config") if isinstance(data.get("peft_config"), dict) else data
    if settings.get("adapter_name_or_path"):
        return {"refused": f"loads the adapter at {settings['adapter_name_or_path']}; trains no new one"}
    if data.get("use_kt"):
        return {"refused": "KTransformers builds the model (use_kt): not the transformers tree"}
    with llama_factory_code() as lf:
        built = meta_model(model)
        build = wrap(built, llama_factory_lora(lf, built, data))
    if build.refused:
        return {"refused": build.refused}
    return {"modules": sorted(build.ranks), "trainable": build.trainable}


# stack -> (plop check's flavour, the stack's own build of one corpus entry)
SECTIONS: dict[str, tuple[str, Callable[[Path, Path], dict]]] = {
    "llama_factory": ("llama-factory", llama_factory_build),
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
    return {"exit": result.exit_code, "modules": result.modules, "trainable": result.trainable,
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
