"""What ``plop check`` costs per config: the model built from config.json on the meta device, the
stack's rules, PEFT's get_peft_model on it, the findings. No weights are read.

Every published config under tests/fixtures/model_configs with two placements each: attention
q/k/v/o as a PEFT list, and PEFT's "all-linear" (on MoE models PEFT's conversion adds the experts
and the router). Each check runs 3 times in one process after a warm-up (imports paid once) and
the median is printed; then `plop check` of the largest models is timed end to end in a fresh
process (imports included), as a user runs it. 2 threads. Results: benchmarks/results/bench_check.json.

    OMP_NUM_THREADS=2 python benchmarks/bench_check.py
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "model_configs"
OUT = ROOT / "benchmarks" / "results" / "bench_check.json"
PLACEMENTS = {"attention": "q_proj,k_proj,v_proj,o_proj", "all-linear": "all-linear"}
FRESH = ("Qwen3-235B-A22B", "DeepSeek-V3")


def in_process() -> list[dict]:
    import torch

    from plop.audit import check, inline_spec

    torch.set_num_threads(2)
    check(inline_spec("q_proj"), FIXTURES / "Llama-3.1-8B.json")  # warm-up: imports
    rows = []
    for path in sorted(FIXTURES.glob("*.json")):
        for placement, targets in PLACEMENTS.items():
            seconds, result = [], None
            for _ in range(3):
                start = time.perf_counter()
                result = check(inline_spec(targets), path)
                seconds.append(time.perf_counter() - start)
            rows.append({"model": path.stem, "placement": placement, "parameters": result.model["parameters"],
                         "trainable": result.trainable, "exit_code": result.exit_code,
                         "median_seconds": round(statistics.median(seconds), 3), "runs": [round(s, 3) for s in seconds]})
            print(f"{path.stem:<24} {placement:<10} {result.model['parameters'] / 1e9:>7.1f} B params  "
                  f"trains {result.trainable:>13,}  {rows[-1]['median_seconds']:>6.2f} s", flush=True)
    return rows


def fresh_process() -> list[dict]:
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    for name in FRESH:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "plop.cli", "check", "--target-modules", "all-linear",
                               str(FIXTURES / f"{name}.json")], capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - start
        rows.append({"model": name, "placement": "all-linear", "cli_seconds": round(seconds, 2), "exit": proc.returncode})
        print(f"fresh `plop check --target-modules all-linear {name}.json`: {seconds:.2f} s (exit {proc.returncode})",
              flush=True)
    return rows


def main() -> None:
    results = {"threads": 2, "cpu": os.cpu_count(), "checks": in_process(), "cli": fresh_process()}
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
