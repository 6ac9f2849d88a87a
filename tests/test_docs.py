"""The documentation: every fenced python/bash block of README.md and docs/ runs or is marked
``<!-- not-run: WHY -->`` and still parses (tests/docs_blocks.py); the README stays a front page whose
links resolve; ``mkdocs build --strict`` passes; and the built site, opened in headless Chromium,
logs no error, requests nothing from outside the machine and finds "target_modules" in its search."""

from __future__ import annotations

import contextlib
import functools
import http.server
import importlib.util
import io
import os
import re
import runpy
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import make_batches, make_llama
from docs_blocks import ROOT, blocks, documents, problems

from plop import diagnose

BROKEN = Path(__file__).parent / "fixtures" / "docs" / "broken.md"
ALL_BLOCKS = [b for path in documents() for b in blocks(path)]
RUNNABLE = [b for b in ALL_BLOCKS if b.not_run is None]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The folder runnable blocks run in: report.json, a tiny LLaMA's diagnosis."""
    folder = tmp_path_factory.mktemp("docs-blocks")
    diagnose(make_llama(), make_batches(16, 16), top_k=3, rank=8, n_bootstrap=20).save(folder / "report.json")
    return folder


def run_python(code: str, folder: Path) -> None:
    script = folder / "block.py"
    script.write_text(code)
    here = Path.cwd()
    os.chdir(folder)  # not contextlib.chdir: Python 3.10
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(str(script), run_name="__main__")
    finally:
        os.chdir(here)


def run_bash(code: str, folder: Path) -> subprocess.CompletedProcess:
    """``plop`` in the block is this interpreter's ``python -m plop`` on this checkout."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "plop").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m plop "$@"\n')
    (bin_dir / "plop").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    return subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=120)


# -- every block, checked without running it --------------------------------------------------
def test_blocks_are_found():
    """The collector sees the README's and the guides' blocks, and most are marked, not all."""
    assert len(ALL_BLOCKS) > 25 and 5 <= len(RUNNABLE) < len(ALL_BLOCKS)
    assert {b.lang for b in RUNNABLE} == {"python", "bash"}


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=lambda b: b.where)
def test_block_parses_and_its_plop_commands_exist(block):
    assert problems(block) == []


# -- the runnable ones, run -------------------------------------------------------------------
@pytest.mark.parametrize("block", [b for b in RUNNABLE if b.lang == "python"], ids=lambda b: b.where)
def test_python_block_runs(block, workspace):
    run_python(block.code, workspace)


@pytest.mark.spawns
@pytest.mark.parametrize("block", [b for b in RUNNABLE if b.lang == "bash"], ids=lambda b: b.where)
def test_bash_block_runs(block, workspace):
    done = run_bash(block.code, workspace)
    assert done.returncode == 0, done.stderr


# -- the checker fails on broken blocks -------------------------------------------------------
def test_checker_catches_broken_blocks(workspace):
    runnable, marked_bash, marked_python = [], None, None
    for block in blocks(BROKEN):
        if block.not_run is None:
            runnable.append(block)
        elif block.lang == "bash":
            marked_bash = block
        else:
            marked_python = block
    assert "unrecognized arguments: --no-such-flag" in problems(marked_bash)[0]
    assert "does not parse" in problems(marked_python)[0]
    python_block = next(b for b in runnable if b.lang == "python")
    assert problems(python_block) == []  # it parses; running it is what fails
    with pytest.raises(AttributeError, match="no_such_field"):
        run_python(python_block.code, workspace)


@pytest.mark.spawns
def test_a_failing_bash_block_fails(workspace):
    bash_block = next(b for b in blocks(BROKEN) if b.lang == "bash" and b.not_run is None)
    done = run_bash(bash_block.code, workspace)
    assert done.returncode == 2 and "no-such-stack" in done.stderr


# -- names and paths in the prose -----------------------------------------------------------
def test_prose_names_only_modules_and_names_that_exist():
    """Every dotted ``plop.`` path the README and docs name resolves (test_layout's rule for
    docstrings), but the report's schema id; and every file the architecture page lists exists."""
    from test_layout import DOTTED, _lookup

    from plop.ranking.report import SCHEMA_ID

    named = {(p.name, name) for p in documents() for name in DOTTED.findall(p.read_text()) if name != SCHEMA_ID}
    assert len(named) > 20 and sorted(n for n in named if _lookup(n[1]) is None) == []
    architecture = (ROOT / "docs" / "architecture.md").read_text()
    files = set(re.findall(r"`((?:plop/)?[a-z_]+/[a-z_]+\.py|plop/[a-z_]+\.py)`", architecture))
    assert len(files) > 30
    assert sorted(f for f in files if not ((ROOT / f).exists() or (ROOT / "plop" / f).exists())) == []


# -- the README as a front page ---------------------------------------------------------------
def test_readme_is_a_front_page_whose_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    targets = [t for t in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text) if "://" not in t]
    assert len(targets) > 20
    assert [t for t in targets if not (ROOT / t).exists()] == []
    assert all(t.startswith("docs/") or t == "notebooks/quickstart.ipynb" for t in targets)  # the site rewrites only these
    assert "make demo" in text and "make test" in text


# -- the site ---------------------------------------------------------------------------------
needs_mkdocs = pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None,
                                  reason="mkdocs is not installed (pip install -e '.[docs]')")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@needs_mkdocs
@pytest.mark.spawns
def test_strict_build_holds_the_reference_pages(site):
    cli = (site / "cli.html").read_text()
    assert all(f"usage: plop {command}" in cli for command in ("diagnose", "show", "export", "check", "train"))
    api = (site / "api.html").read_text()
    assert all(name in api for name in ("plop.diagnosis.diagnose", "plop.audit.check.check", "PlopError"))
    assert not re.search(r":(class|func|meth|mod|data):<code>", api)  # docstrings' roles became references
    assert 'href="#plop.errors.PlopError"' in api
    front = (site / "index.html").read_text()
    assert "make demo" in front and 'href="getting-started.html"' in front


@needs_mkdocs
@pytest.mark.spawns
def test_site_in_headless_chromium(site):
    """Served on a local port: four pages render with no console error and no request leaving the
    machine, and the search box finds target_modules."""
    sync_api = pytest.importorskip("playwright.sync_api")
    from test_html import _chromium

    browser_path = _chromium()
    handler = functools.partial(QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}/"
    problems_seen, outside = [], []
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            page.on("console", lambda m: problems_seen.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems_seen.append(str(e)))
            page.on("request", lambda r: None if r.url.startswith((base, "data:", "blob:")) else outside.append(r.url))
            for path, text in [("index.html", "measured before you fine-tune"),
                               ("integrations/axolotl.html", "PlopPlugin"),
                               ("api.html", "plop.diagnosis.diagnose"),
                               ("quickstart.html", "plop quickstart")]:
                page.goto(base + path, wait_until="networkidle")
                assert text in page.content(), path
            page.locator("input.md-search__input").click()  # material's search runs on typed keys
            page.keyboard.type("target_modules")
            page.wait_for_selector(".md-search-result__item", timeout=20_000)
            hits = page.locator(".md-search-result__item").count()
            browser.close()
    finally:
        server.shutdown()
    assert problems_seen == [] and outside == []
    assert hits > 0


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # the suite's output is pytest's
        pass
