"""``plop export`` reads back what it wrote and resolves it on the report's modules with PEFT's
matcher: quiet when it is the recommendation, one exact line when it is not."""

from __future__ import annotations

import subprocess

import pytest

from conftest import make_batches, make_llama
from plop import diagnose
from plop.audit.verify import export_difference, resolve_export
from plop.stacks import FORMATS, export
from test_cli import ENV, PLOP


@pytest.fixture(scope="module")
def reports():
    top = diagnose(make_llama(), make_batches(16, 16), rank=8, n_bootstrap=50, top_k=3)
    per = diagnose(make_llama(), make_batches(16, 16), rank=8, n_bootstrap=50, top_k=1, strategy="per_layer")
    return {"top_k": top, "per_layer": per}


@pytest.mark.parametrize("which", ["top_k", "per_layer"])
@pytest.mark.parametrize("fmt", [f for f in FORMATS if f not in ("torchtune", "spectrum")])
def test_exact_exports_resolve_to_the_recommendation(reports, which, fmt):
    report = reports[which]
    result = export(report, fmt)
    assert result.exact
    assert resolve_export(result.text, fmt, report) == set(report.recommendation.modules)
    assert export_difference(result.text, fmt, report) is None


def test_a_superset_export_says_exactly_what_it_adds(reports):
    report = reports["top_k"]
    result = export(report, "torchtune")
    reached = resolve_export(result.text, "torchtune", report)
    extra = reached - set(report.recommendation.modules)
    # torchtune's switches: the whole MLP if any of it is chosen, every chosen attention projection
    mlp = {"gate_proj", "up_proj", "down_proj"}
    wanted = {m.name for m in report.modules if m.type in set(report.recommendation.types) | (
        mlp if mlp & set(report.recommendation.types) else set())}
    assert reached == wanted
    assert export_difference(result.text, "torchtune", report).startswith(
        f"read back, the torchtune export reaches {len(extra)} modules beyond the recommendation")


def test_an_edited_export_is_caught(reports):
    report = reports["top_k"]
    text = export(report, "axolotl").text
    first = report.recommendation.types[0]
    edited = text.replace(f"- {first}\n", "- W_pack\n")
    n = sum(m.type == first for m in report.modules)
    assert export_difference(edited, "axolotl", report).endswith(
        f"misses {n} recommended (e.g. {sorted(m.name for m in report.modules if m.type == first)[0]})")


@pytest.mark.spawns
def test_cli_export_of_a_plain_recommendation_is_quiet(reports, tmp_path):
    report = reports["top_k"]
    path = tmp_path / "report.json"
    report.save(path)
    for fmt in ("axolotl", "trl", "llama-factory", "mlx-lm"):
        proc = subprocess.run([*PLOP, "export", str(path), "--to", fmt], capture_output=True, text=True, env=ENV,
                              timeout=120)
        assert proc.returncode == 0 and proc.stderr == "", (fmt, proc.stderr)
    proc = subprocess.run([*PLOP, "export", str(path), "--to", "torchtune"], capture_output=True, text=True,
                          env=ENV, timeout=120)
    assert "read back, the torchtune export reaches" in proc.stderr
