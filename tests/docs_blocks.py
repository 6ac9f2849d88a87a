"""The fenced code blocks of README.md and docs/: found, checked and run (tests/test_docs.py).

A ``python`` or ``bash`` block runs in the test suite unless the line before its fence is the marker
``<!-- not-run: WHY -->``. Every block is still checked: a Python block must parse, and every
``plop ...`` command in a shell block (``python -m plop.cli ...`` under torchrun or accelerate too)
must parse with plop's own argparse parser, so a renamed flag or command fails the suite. Paths in
commands are placeholders: the parser never opens them.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
import shlex
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ("python", "bash")
MARKER = re.compile(r"^\s*<!--\s*not-run:\s*(.+?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
SHELL_BREAKS = {">", ">>", "2>", "|", "&&", "||", ";", "&"}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    not_run: str | None  # the marker's reason, None: the suite runs it

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path}:{self.line}"


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks(path: Path) -> list[Block]:
    """The python and bash blocks of one Markdown file, indented ones (inside a list item) included."""
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, lang = opening.groups()
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        marker = MARKER.match(lines[i - 1]) if i else None
        if lang in CHECKED:
            code = textwrap.dedent("\n".join(lines[i + 1:end]))
            found.append(Block(path, i + 1, lang, code, marker.group(1) if marker else None))
        i = end + 1
    return found


def plop_commands(code: str) -> list[list[str]]:
    """The arguments after ``plop`` (or ``-m plop.cli``) of each command line of a shell block."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        for cut, word in enumerate(words):
            if word in SHELL_BREAKS:
                words = words[:cut]
                break
        if words[:1] == ["plop"]:
            commands.append(words[1:])
        elif "plop.cli" in words and words[words.index("plop.cli") - 1] == "-m":
            commands.append(words[words.index("plop.cli") + 1:])
    return commands


def problems(block: Block) -> list[str]:
    """What is wrong with a block without running it: Python that does not parse, plop commands
    that plop's parser refuses."""
    if block.lang == "python":
        try:
            ast.parse(block.code)
        except SyntaxError as error:
            return [f"{block.where}: does not parse: {error}"]
        return []
    from plop.cli import build_parser

    found = []
    for args in plop_commands(block.code):
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                build_parser().parse_args(args)
        except SystemExit as error:
            if error.code:  # --help and --version exit 0
                found.append(f"{block.where}: plop {shlex.join(args)}: {stderr.getvalue().strip().splitlines()[-1]}")
    return found
