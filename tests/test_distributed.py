"""Several real processes on gloo, started by ``torchrun`` like a user would: the data-parallel
diagnosis equals the single-process one, training is genuine data parallelism with one writer,
and a process that fails ends the whole job with plop's one-line error."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plop.files.data import sample_indices
from tiny_lm import make_tokenizer, save_tiny, write_jsonl

pytestmark = pytest.mark.spawns  # each test here starts torchrun

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "120", "PYTHONWARNINGS": "ignore",
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHERS = {  # as docs/big-models/data-parallel.md writes them
    "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "{n}", "--master_port", "{port}"],
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "{n}",
                   "--main_process_port", "{port}"],
}


def plop(*args, processes: int = 1, launcher: str = "torchrun", cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``plop ARGS`` in one process, or under ``torchrun --nproc_per_node PROCESSES`` (or accelerate)."""
    port = str(_free_port())
    launcher = [a.format(n=processes, port=port) for a in LAUNCHERS[launcher]] if processes > 1 else []
    launcher += ["-m", "plop.cli"]
    return subprocess.run([sys.executable, *launcher, *map(str, args)], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=240)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    return {"model": save_tiny(root / "model"), "data": write_jsonl(root / "data.jsonl", 48)}


@pytest.mark.parametrize("processes, options", [
    (2, ["--samples", "40", "--batch-size", "4"]),
    (3, ["--until-stable", "--batch-size", "2", "--per-layer"]),  # uneven shares, the until_stable stop
])
def test_a_data_parallel_diagnosis_equals_one_process(tiny, tmp_path, processes, options):
    args = ["diagnose", tiny["model"], "--data", tiny["data"], *options, "--out"]
    ok(plop(*args, tmp_path / "one.json"))
    many = ok(plop(*args, tmp_path / "many.json", processes=processes))
    one, par = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "many"))
    assert [m["name"] for m in par["modules"]] == [m["name"] for m in one["modules"]]
    for a, b in zip(one["modules"], par["modules"]):
        assert b["nfn"] == pytest.approx(a["nfn"], rel=1e-9) and b["token_count"] == a["token_count"], a["name"]
        assert (b["calls"], b["input_norm_max"]) == (a["calls"], a["input_norm_max"])
    assert [t["type"] for t in par["types"]] == [t["type"] for t in one["types"]]
    assert par["recommendation"] == one["recommendation"] and par["stability"] == one["stability"]
    assert (par["data"]["samples"], par["data"]["token_count"]) == (one["data"]["samples"], one["data"]["token_count"])
    assert many.stdout.count("report written to") == 1  # rank 0 alone prints and writes


def test_a_data_parallel_diagnosis_gathers_moe_experts(tmp_path):
    """A tiny Mixtral (3-D expert weights): per-expert NFN, routed tokens and the bootstrap are
    gathered across processes like the linear modules' sums."""
    import archs

    model = archs.build("mixtral")
    model.save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", 24)
    args = ["diagnose", tmp_path / "model", "--data", data, "--samples", "24", "--batch-tokens", "40", "--out"]
    ok(plop(*args, tmp_path / "one.json"))
    ok(plop(*args, tmp_path / "many.json", processes=2))
    one, par = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "many"))
    experts = [m for m in one["modules"] if m.get("experts")]
    assert {m["type"] for m in experts} == {"experts.gate_up_proj", "experts.down_proj"}
    by_name = {m["name"]: m for m in par["modules"]}
    for a in one["modules"]:
        b = by_name[a["name"]]
        assert b["nfn"] == pytest.approx(a["nfn"], rel=1e-9) and b["token_count"] == a["token_count"], a["name"]
        assert b["calls"] == a["calls"] and b["input_norm_max"] == a["input_norm_max"]
        if a.get("experts"):
            assert b["expert_nfn"] == pytest.approx(a["expert_nfn"], rel=1e-9)
    assert par["recommendation"] == one["recommendation"] and par["stability"] == one["stability"]


def test_a_failing_process_ends_the_job_with_one_line_errors(tmp_path):
    """A checkpoint whose embedding of '#' is NaN, and one data row with a '#', which lands in the
    second process's batch: that process fails, the first stops with it, both exit 2."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(save_tiny(tmp_path / "model"))
    with torch.no_grad():
        model.get_input_embeddings().weight[make_tokenizer().convert_tokens_to_ids("#")] = float("nan")
    model.save_pretrained(tmp_path / "model")
    rows = [{"prompt": f"Q: {i}?\nA: ", "response": "ok"} for i in range(8)]
    rows[sample_indices(8, None, 0)[1]]["prompt"] = "Q: #?\nA: "  # the second batch: one row each, all one length
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    proc = plop("diagnose", tmp_path / "model", "--data", tmp_path / "data.jsonl", "--batch-tokens", "1",
                "--out", tmp_path / "report.json", processes=2)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("plop: error:")]
    assert len(errors) == 2 and all("non-finite feature norm" in e for e in errors), proc.stderr
    assert sum("process 1 of 2 failed" in e for e in errors) == 1
    # torchrun's summary: every process that said its line exited 2 (not SIGTERMed nor aborted in
    # the process group's teardown, which both happened before plop left at once)
    assert re.findall(r"exitcode  : (-?\d+)", proc.stderr) == ["2", "2"], proc.stderr
    assert f'File "{ROOT / "plop"}' not in proc.stderr  # no traceback from plop itself
    assert not (tmp_path / "report.json").exists()


def test_training_is_data_parallel_with_one_writer_and_resumes(tiny, tmp_path):
    common = [tiny["model"], "--data", tiny["data"], "--samples", "16", "--eval-fraction", "0", "--batch-size", "2"]
    ok(plop("train", *common, "--placement", "qv", "--steps", "3", "--output-dir", tmp_path / "one"))
    par = ok(plop("train", *common, "--steps", "3", "--output-dir", tmp_path / "two", processes=2))
    one, two = (json.loads((tmp_path / name / "plop_train_summary.json").read_text()) for name in ("one", "two"))
    assert (one["world_size"], one["global_batch"], two["world_size"], two["global_batch"]) == (1, 2, 2, 4)
    assert two["epochs"] == pytest.approx(2 * one["epochs"])  # each step consumed twice the examples
    assert par.stderr.count("diagnosed:") == par.stdout.count("adapter written to") == 1
    assert (tmp_path / "two" / "plop_report.json").is_file()

    resumed = ok(plop("train", *common, "--steps", "5", "--output-dir", tmp_path / "two", "--resume", processes=2))
    summary = json.loads((tmp_path / "two" / "plop_train_summary.json").read_text())
    assert summary["steps"] == 5 and summary["resumed_from"].endswith("checkpoint-3")
    assert "diagnosed:" not in resumed.stderr  # the run keeps its placement: the saved report

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["model"]), tmp_path / "two")
    assert sorted(model.peft_config["default"].target_modules) == sorted(summary["target_modules"])


def test_accelerate_launch_trains_data_parallel_too(tiny, tmp_path):
    proc = ok(plop("train", tiny["model"], "--data", tiny["data"], "--samples", "16", "--batch-size", "2",
                   "--steps", "1", "--output-dir", tmp_path / "run", processes=2, launcher="accelerate"))
    summary = json.loads((tmp_path / "run" / "plop_train_summary.json").read_text())
    assert (summary["world_size"], summary["global_batch"]) == (2, 4) and proc.stdout.count("adapter written") == 1


def test_compare_runs_each_placement_data_parallel(tiny, tmp_path):
    proc = ok(plop("compare", tiny["model"], "--data", tiny["data"], "--samples", "16", "--batch-size", "2",
                   "--placements", "recommended,qv", "--steps", "1", "--out", tmp_path / "compare.json", processes=2))
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert [r["placement"] for r in saved["rows"]] == ["recommended", "qv"]
    assert proc.stdout.count("results written to") == 1
