"""Does ``plop check`` agree with a stack's own code on that stack's published configs?
``python benchmarks/stack_agreement.py --stack NAME`` writes ``results/stack_agreement_<NAME>.json``:
per config, the modules and trainable count plop reports beside the stack's own build, whether they
agree and, where not, why. Each stack's part is one function in its own section below, registered
in :data:`STACKS`; it needs that stack's extra (``make test-stacks`` installs them all).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CORPUS = ROOT / "tests" / "corpus"


def plop_side(path: Path) -> dict[str, Any]:
    """``plop check`` on one config, in-process: exit code, trainable count and adapted modules, or
    the one line it refuses with."""
    from plop.audit import check
    from plop.errors import PlopError

    try:
        result = check(path)
    except PlopError as e:
        return {"exit": 2, "error": str(e).splitlines()[0]}
    return {"exit": result.exit_code, "trainable": result.trainable, "modules": sorted(result.modules),
            "findings": [f.code for f in result.findings]}


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
    import yaml

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


STACKS: dict[str, Callable[[], dict[str, Any]]] = {"torchtune": torchtune_agreement}


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
