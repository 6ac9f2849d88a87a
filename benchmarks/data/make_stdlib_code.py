"""Build the code task of the placement study: docstring -> function body pairs from the Python
standard library's own source on this machine (PSF licence; see STDLIB_LICENSE.md).

Each row is one top-level or method function with a docstring: ``prompt`` is its signature and
docstring, ``response`` its body without the docstring. Deterministic: files and functions are
visited in sorted order, and a seeded shuffle picks the rows.

    python benchmarks/data/make_stdlib_code.py    # writes benchmarks/data/stdlib_code.jsonl
"""

from __future__ import annotations

import ast
import json
import random
import sysconfig
from pathlib import Path

OUT = Path(__file__).with_name("stdlib_code.jsonl")
ROWS = 1500
MAX_CHARS = 1500  # prompt + response: the study trains at max_length 256 tokens


def pairs(path: Path):
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
            continue
        doc = node.body[0]
        if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
            continue
        prompt = "\n".join(lines[node.lineno - 1 - len(node.decorator_list): doc.end_lineno]) + "\n"
        response = "\n".join(lines[doc.end_lineno: node.end_lineno]) + "\n"
        if response.strip() and len(prompt) + len(response) <= MAX_CHARS:
            yield {"prompt": prompt, "response": response, "source": f"{path.name}:{node.lineno}"}


def main() -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py"))  # top-level modules only: no tests, no site-packages
    rows = [row for f in files for row in pairs(f)]
    random.Random(0).shuffle(rows)
    with OUT.open("w", encoding="utf-8") as f:
        for row in rows[:ROWS]:
            f.write(json.dumps(row) + "\n")
    print(f"{min(ROWS, len(rows))} of {len(rows)} pairs from {len(files)} files in {stdlib} -> {OUT}")


if __name__ == "__main__":
    main()
