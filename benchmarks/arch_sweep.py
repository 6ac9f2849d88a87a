"""The support matrix: every tiny architecture of ``tests/archs.py`` through ``plop.diagnose`` ->
PEFT export -> ``get_peft_model`` -> one backward step (``tests/sweep.py``, which
``tests/test_sweep.py`` asserts on), and what the MoE expert hooks cost next to a plain forward.

    PYTHONPATH=.:tests OMP_NUM_THREADS=1 python benchmarks/arch_sweep.py [--out benchmarks/results/arch_sweep.json]

Prints the support-matrix table of docs/architectures.md (markdown) and one line for the expert hooks.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import archs
import sweep
from conftest import make_batches
from plop.measure.collector import NFNCollector
from plop.measure.experts import ExpertStats
from plop.model.experts import find_experts
from plop.model.layers import find_linear_modules


def row(name: str) -> dict:
    start = time.perf_counter()
    r = sweep.run(name)
    ok = r.wrapped == r.chosen and r.trainable == r.costed and not r.no_grad
    return {"arch": name, "kind": r.kind, "types": len(r.types), "experts": r.expert_types,
            "recommended": r.recommended, "target_modules": r.target_modules, "target_parameters": r.target_parameters,
            "excluded": sorted(r.excluded), "coverage": r.coverage, "undiagnosed": r.undiagnosed,
            "unseen": r.unseen, "peft_exact_and_trains": ok, "seconds": round(time.perf_counter() - start, 2)}


def _forward_seconds(model, batches, hooks: str, repeats: int = 5) -> float:
    """Best of ``repeats`` passes over ``batches``: plain, with the linear hooks, or with both."""
    best = float("inf")
    for _ in range(repeats):
        collector = NFNCollector(find_linear_modules(model), n_bootstrap=20)
        experts = ExpertStats(find_experts(model), 20)
        start = time.perf_counter()
        with torch.no_grad(), collector if hooks != "none" else _null(), experts if hooks == "all" else _null():
            for batch in batches:
                if hooks != "none":
                    collector.start_batch(batch["attention_mask"])
                    experts.start_batch(batch["attention_mask"], collector.weights)
                model.model(**batch, use_cache=False)
                if hooks != "none":
                    collector.flush()
        best = min(best, time.perf_counter() - start)
    return best


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def expert_hook_cost() -> dict:
    """Seconds of a plain forward, with the linear hooks, and with the expert hooks as well, on
    the tiny Mixtral (4 experts, top-2) over 8 x 128 tokens."""
    model = archs.build("mixtral")
    batches = make_batches(8, 128, 4, vocab=archs.SAFE_VOCAB)
    plain, linear, both = (_forward_seconds(model, batches, h) for h in ("none", "linear", "all"))
    return {"model": "tiny mixtral (hidden 32, 4 experts, top-2), 8 x 128 tokens", "plain_s": round(plain, 4),
            "linear_hooks_s": round(linear, 4), "with_expert_hooks_s": round(both, 4),
            "expert_hooks_over_plain": round((both - linear) / plain, 2), "all_hooks_over_plain": round(both / plain, 2)}


def table(rows: list[dict]) -> str:
    lines = ["| architecture | kind | types | expert weights | left out (PEFT) | coverage | PEFT exact + trains |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['kind']} | {r['types']} | {', '.join(r['experts']) or '-'} | "
                     f"{', '.join(r['excluded']) or '-'} | {r['coverage']:.0%} | "
                     f"{'yes' if r['peft_exact_and_trains'] else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("archs", nargs="*", default=list(archs.ARCHS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = [row(name) for name in args.archs]
    sweep_seconds = round(time.perf_counter() - start, 1)
    cost = expert_hook_cost()
    print(table(rows))
    print(f"\n{len(rows)} architectures in {sweep_seconds} s; expert hooks: {cost}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"sweep_seconds": sweep_seconds, "expert_hook_cost": cost, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
