"""mkdocs hooks: the site's front page is README.md, and the command-line reference is generated from
plop's own argparse parsers at build time, so neither can drift from its source."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI_MARKER = "<!-- cli-reference -->"
# a Sphinx role as mkdocstrings renders it from plop's docstrings: :class:<code>~plop.config.DiagnoseConfig</code>
SPHINX_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):<code>(~?)\.?([\w.]+)</code>")


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 - mkdocs' hook signature
    if page.file.src_uri == "index.md":
        return front_page()
    if page.file.src_uri == "cli.md":
        return markdown.replace(CLI_MARKER, cli_reference())
    return markdown


def on_page_content(html: str, page, config, files) -> str:  # noqa: ARG001 - mkdocs' hook signature
    """The docstrings' Sphinx roles become cross-references: a link where the site documents the
    object (mkdocs-autorefs resolves them once every page is rendered), plain code where it does not."""
    return SPHINX_ROLE.sub(_autoref, html)


def _autoref(match: re.Match) -> str:
    short, name = match.groups()
    title = name.rsplit(".", 1)[-1] if short else name  # `~` shows the last part, as Sphinx does
    return f'<autoref identifier="{name}" optional><code>{title}</code></autoref>'


def front_page() -> str:
    """README.md, its links into docs/ made relative to the site (docs/x.md -> x.md)."""
    text = (ROOT / "README.md").read_text()
    text = re.sub(r"\]\(docs/", "](", text)
    text = text.replace("](notebooks/quickstart.ipynb)", "](quickstart.ipynb)")  # linked into docs/
    return text


def cli_reference() -> str:
    """Every command's --help, as `plop COMMAND --help` prints it, at a fixed width."""
    os.environ["COLUMNS"] = "100"  # argparse wraps at the terminal width: fix it for a stable page
    from plop.cli import build_parser

    sections = []
    for name, parser in _commands(build_parser(), "plop"):
        sections.append(f"## `{name}`\n\n```text\n{parser.format_help().rstrip()}\n```")
    return "\n\n".join(sections)


def _commands(parser: argparse.ArgumentParser, name: str):
    """(command line, parser) for the parser and each of its subcommands, depth first."""
    yield name, parser
    for action in parser._actions:  # argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                yield from _commands(subparser, f"{name} {sub}")
