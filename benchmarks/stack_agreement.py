"""Does ``plop check`` agree with a stack's own code on that stack's published configs?
``python benchmarks/stack_agreement.py --stack NAME`` writes ``results/stack_agreement_<NAME>.json``:
per config, the modules and trainable count plop reports beside the stack's own build, whether they
agree (the same modules and count, or both refuse) and, where not, why. Each stack's part is one
function in its own section below, registered in :data:`STACKS`; it needs that stack's extra
(``make test-stacks`` installs them all).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib
import importlib.util
import json
import os
import sys
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CORPUS = ROOT / "tests" / "corpus"


def plop_side(path: Path, model: Path | None = None, flavour: str | None = None) -> dict[str, Any]:
    """``plop check`` on one config, in-process: exit code, trainable count and adapted modules (in
    the stack's own names where it has its own tree), or the one line it refuses with (exit 2, or a
    finding that the stack itself refuses the config)."""
    from plop.audit import check
    from plop.errors import PlopError

    try:
        result = check(path, model, flavour=flavour)
    except PlopError as e:
        return {"exit": 2, "error": str(e).splitlines()[0]}
    refused = next((f.message for f in result.errors if f.code.endswith("refuses")), None)
    return {"exit": result.exit_code, "trainable": result.trainable,
            "modules": sorted(result.stack_modules or result.modules), "findings": [f.code for f in result.findings],
            **({"error": refused} if refused else {})}


def compare(plop: dict[str, Any], stack: dict[str, Any]) -> tuple[bool, str | None]:
    """Agreement: the same adapted modules and the same trainable count; else the first difference."""
    if "error" in stack:
        return "error" in plop, None if "error" in plop else f"the stack refuses it ({stack['error']}); plop does not"
    if "error" in plop:
        return False, f"plop refuses it: {plop['error']}"
    extra, missing = sorted(set(plop["modules"]) - set(stack["modules"])), sorted(set(stack["modules"]) - set(plop["modules"]))
    if extra or missing:
        return False, f"{len(extra)} modules only plop adapts, {len(missing)} only the stack (e.g. {(extra or missing)[0]})"
    if plop["trainable"] != stack["trainable"]:
        return False, f"trainable {plop['trainable']:,} (plop) vs {stack['trainable']:,} (the stack)"
    return True, None


def report(stack: str, rows: list[dict[str, Any]], about: dict[str, Any]) -> dict[str, Any]:
    agree = sum(r["agree"] for r in rows)
    return {"stack": stack, **about, "configs": len(rows), "agree": agree,
            "disagree": [{"config": r["config"], "reason": r["reason"]} for r in rows if not r["agree"]], "rows": rows}


# -- torchtune ----------------------------------------------------------------------------------
def torchtune_agreement() -> dict[str, Any]:
    """Every recipe in tests/corpus/torchtune (torchtune's own LoRA configs at the pinned release):
    plop check, beside torchtune's builder instantiated from the recipe's ``model:`` block on the
    meta device and trained as its LoRA recipes do (benchmarks/torchtune_builders.py recipe_truth)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from torchtune_builders import _installed_version, recipe_truth

    rows = []
    for path in sorted((CORPUS / "torchtune").rglob("*.yaml")):
        start = time.perf_counter()
        block = yaml.safe_load(path.read_text(encoding="utf-8"))["model"]
        try:
            names, trainable = recipe_truth(block)
            stack = {"trainable": trainable, "modules": sorted(names)}
        except Exception as e:  # noqa: BLE001  (whatever torchtune raises is its refusal, recorded)
            stack = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"}
        plop = plop_side(path)
        agree, reason = compare(plop, stack)
        rel = path.relative_to(CORPUS / "torchtune")
        rows.append({"config": str(rel), "source": f"pytorch/torchtune@v{_installed_version()}:recipes/configs/{rel}",
                     "component": block.get("_component_"), "agree": agree, "reason": reason,
                     "plop": _summary(plop), "stack_result": _summary(stack),
                     "seconds": round(time.perf_counter() - start, 2)})
    return report("torchtune", rows, {"version": _installed_version()})


def _summary(side: dict[str, Any]) -> dict[str, Any]:
    """A side without its module list (the JSON keeps the count; the lists agree or the reason says how not)."""
    return {**{k: v for k, v in side.items() if k != "modules"}, **({"modules": len(side["modules"])} if "modules" in side else {})}


# -- mlx-lm -------------------------------------------------------------------------------------
# mlx_lm/lora.py's run up to training, on the CPU: CONFIG_DEFAULTS under the config (the config's
# lora_parameters replaces the defaults' whole mapping), mlx-lm's own model of config.json (random
# weights, never evaluated: mlx is lazy, so even 235B parameters cost nothing), train's num_layers
# check, then linear_to_lora_layers and the trainable count.
def mlx_lm_build(config: Path, model: Path) -> dict:
    """What mlx-lm trains for ``config`` on ``model``: its wrapped modules and trainable count, or its refusal."""
    from mlx.utils import tree_flatten
    from mlx_lm.lora import CONFIG_DEFAULTS
    from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import _get_classes

    from mlx_lm.lora import yaml_loader  # PyYAML's SafeLoader with mlx-lm's float resolver: what main() reads with

    args = {**CONFIG_DEFAULTS, **{k: v for k, v in yaml.load(config.read_text(), yaml_loader).items() if v is not None}}
    if args["fine_tune_type"] == "full":  # train_model unfreezes the last num_layers blocks whole, no adapter
        return {"error": "fine_tune_type full: mlx-lm trains whole blocks, no LoRA"}
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
        return {"error": f"{type(e).__name__}: {e}"}
    kinds = (LoRALinear, LoRASwitchLinear, LoRAEmbedding, DoRALinear, DoRAEmbedding)
    return {"modules": sorted(n for n, m in built.named_modules() if isinstance(m, kinds)),
            "trainable": sum(v.size for _, v in tree_flatten(built.trainable_parameters()))}


def indexed_agreement(stack: str, flavour: str, package: str, own_build: Callable[[Path, Path], dict]) -> dict[str, Any]:
    """Every entry of tests/corpus/<stack>/index.json (a config, its base model's config.json and
    their sources): plop check beside ``own_build``, the stack's own build of the pair."""
    rows = []
    for entry in json.loads((CORPUS / stack / "index.json").read_text()):
        config, model = CORPUS / stack / entry["config"], (CORPUS / stack / entry["model"]).resolve()
        start = time.perf_counter()
        own = own_build(config, model)
        plop = plop_side(config, model, flavour)
        agree, reason = compare(plop, own)
        rows.append({"config": entry["name"], "agree": agree, "reason": reason, "plop": _summary(plop),
                     "stack_result": _summary(own), "seconds": round(time.perf_counter() - start, 2)})
    return report(stack, rows, {"version": version(package)})


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
        return {"error": f"loads the adapter at {settings['adapter_name_or_path']}; trains no new one"}
    if data.get("use_kt"):
        return {"error": "KTransformers builds the model (use_kt): not the transformers tree"}
    with llama_factory_code() as lf:
        built = meta_model(model)
        build = wrap(built, llama_factory_lora(lf, built, data))
    if build.refused:
        return {"error": build.refused}
    return {"modules": sorted(build.ranks), "trainable": build.trainable}


# -- axolotl ---------------------------------------------------------------------------------------
@contextmanager
def _peft_as_shipped() -> Iterator[None]:
    """load_lora patches PEFT's classes for the whole process (ParamWrapper's dropout, Gemma-4's
    clippable linears); undo that afterwards, so plop's side of the comparison runs on PEFT itself."""
    from peft.tuners.lora.layer import ParamWrapper
    from peft.tuners.lora.model import LoraModel

    saved = {cls: dict(vars(cls)) for cls in (ParamWrapper, LoraModel)}
    try:
        yield
    finally:
        for cls, attributes in saved.items():
            for name in set(vars(cls)) - set(attributes):
                delattr(cls, name)
            for name, value in attributes.items():
                if vars(cls).get(name) is not value:
                    setattr(cls, name, value)


# axolotl's own load_lora (axolotl/loaders/adapter.py): the LoraConfig it builds from the YAML's
# fields (lora_target_linear through its find_all_linear_names, lora_modules_to_save, its dropout
# patch for expert parameters) and its get_peft_model call, on the model class its loader picks for
# config.json (built on the meta device), after its own schema of those fields (utils/schemas/peft.py)
# has checked them and filled their defaults. The rest of its config validation and its plugins are
# not run.
def axolotl_build(config: Path, model: Path) -> dict:
    """What axolotl trains for ``config`` on ``model``: its wrapped modules and trainable count, or its refusal."""
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")  # its telemetry, off before it is imported
    import transformers
    from accelerate import init_empty_weights
    from axolotl.loaders.adapter import load_lora
    from axolotl.utils.dict import DictDefault
    from axolotl.utils.schemas.peft import LoraConfig as LoraSchema

    from plop.audit.meta import load_config
    from plop.audit.resolve import wrapped_targets

    data = yaml.safe_load(config.read_text())
    try:  # its LoRA fields through its own schema (lora_dropout's default of 0, its checks)
        cfg = DictDefault({**data, **LoraSchema.model_validate(data).model_dump()})
    except ValueError as e:  # pydantic's ValidationError
        return {"error": f"axolotl refuses it: {str(e).splitlines()[0]}"}
    if cfg.peft and cfg.peft.loftq_config:  # LoftQ's first values come from quantizing the weights on a
        cfg.peft = None                     # GPU; without it PEFT wraps the same modules at the same shapes
    # axolotl's ModelLoader: the image-text class for a multimodal config (a processor_type), else the
    # class model_type names, else the causal LM
    named = getattr(transformers, cfg.model_type or "", None)
    auto = transformers.AutoModelForImageTextToText if cfg.processor_type else named or transformers.AutoModelForCausalLM
    with init_empty_weights(), _peft_as_shipped():
        built = (auto.from_config if auto.__name__.startswith("Auto") else auto._from_config)(load_config(model))
        try:
            peft_model, _ = load_lora(built, cfg)
        except (ValueError, TypeError, KeyError, RuntimeError, NotImplementedError) as e:
            return {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
    return {"modules": sorted(key for key, _ in wrapped_targets(peft_model.base_model.model).values()),
            "trainable": peft_model.get_nb_trainable_parameters()[0]}


STACKS: dict[str, Callable[[], dict[str, Any]]] = {
    "torchtune": torchtune_agreement,
    "mlx_lm": functools.partial(indexed_agreement, "mlx_lm", "mlx-lm", "mlx-lm", mlx_lm_build),
    "llama_factory": functools.partial(indexed_agreement, "llama_factory", "llama-factory", "llamafactory", llama_factory_build),
    "axolotl": functools.partial(indexed_agreement, "axolotl", "axolotl", "axolotl", axolotl_build),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", required=True, choices=sorted(STACKS))
    args = parser.parse_args()
    result = STACKS[args.stack]()
    out = RESULTS / f"stack_agreement_{args.stack}.json"
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"{args.stack}: {result['agree']}/{result['configs']} configs agree; wrote {out.relative_to(ROOT)}")
    for row in result["disagree"]:
        print(f"  {row['config']}: {row['reason']}")


if __name__ == "__main__":
    main()
