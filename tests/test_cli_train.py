"""``plop train``, ``plop compare`` and ``plop adapters`` through the real entry point, in subprocesses,
on a tiny LLaMA saved to disk: a run that diagnoses first, its listing and merge, an interrupt
followed by --resume, and every error class as one line with exit code 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from plop import diagnose
from tiny_lm import examples, make_model, make_tokenizer, save_tiny, write_jsonl

pytestmark = pytest.mark.spawns  # each test here starts plop as a process

torch.set_num_threads(1)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def plop(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "plop.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plop: error: ") and message in lines[0], result.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny model, training data, and a report diagnosed on another (wider) model."""
    root = tmp_path_factory.mktemp("cli")
    other = diagnose(make_model(hidden=48), [e.text for e in examples(8)], make_tokenizer())
    return {"model": save_tiny(root / "model"), "data": write_jsonl(root / "data.jsonl"),
            "other_report": other.save(root / "other.json"), "root": root}


def test_train_diagnoses_first_then_adapters_list_and_merge(tiny, tmp_path):
    out = tmp_path / "run"
    result = plop("train", tiny["model"], "--data", tiny["data"], "--steps", 4, "--lr", "0.01", "--output-dir", out)
    assert result.returncode == 0, result.stderr
    assert "diagnosed: LoRA goes on" in result.stderr and "trained LoRA+ (ratio 16) rank 16" in result.stdout
    summary = json.loads((out / "plop_train_summary.json").read_text())
    report = json.loads((out / "plop_report.json").read_text())
    assert summary["placement"] == "recommended" and summary["steps"] == 4
    assert summary["target_modules"] == report["recommendation"]["target_modules"]
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]

    one_line_error(plop("train", tiny["model"], "--data", tiny["data"], "--output-dir", out),
                   "already holds a training run")

    listing = plop("adapters", "list", out)
    assert listing.returncode == 0 and "default" in listing.stdout and "recommended" in listing.stdout

    merged = plop("adapters", "merge", out, "default", "--output-dir", tmp_path / "merged")
    assert merged.returncode == 0, merged.stderr
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "merged" / "tokenizer.json").is_file()


def test_train_diagnoses_the_default_sample_and_remeasures_those_rows(tiny, tmp_path):
    """plop train reads as many rows for its diagnosis as plop diagnose does, and measures NFN again
    after training on those very rows: the frozen side of the change is the report's NFN."""
    out = tmp_path / "run"
    data = write_jsonl(tmp_path / "many.jsonl", 150)
    result = plop("train", tiny["model"], "--data", data, "--steps", 1, "--output-dir", out)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "plop_report.json").read_text())
    assert report["data"]["samples"] == report["settings"]["samples"] == 100  # of the 150 rows trained on
    frozen = json.loads((out / "plop_train_summary.json").read_text())["nfn_change"]
    assert {t: c["frozen"] for t, c in frozen.items()} == pytest.approx(
        {t["type"]: t["nfn_mean"] for t in report["types"]}, rel=1e-9)


def test_interrupt_leaves_a_checkpoint_that_resume_continues(tiny, tmp_path):
    out = tmp_path / "run"
    args = ["train", tiny["model"], "--data", tiny["data"], "--placement", "qv", "--batch-size", 4,
            "--output-dir", out]
    # stderr goes to a file: the progress bar written there must never fill a pipe nobody reads
    with (tmp_path / "stderr.txt").open("w") as err:
        process = subprocess.Popen([sys.executable, "-m", "plop.cli", *map(str, args), "--steps", "20000"],
                                   stdout=subprocess.PIPE, stderr=err, text=True, env=ENV)
        for line in process.stdout:  # the Trainer prints a log line every 2 % of the run: training is under way
            if "'loss'" in line:
                process.send_signal(signal.SIGINT)
                break
        process.communicate(timeout=120)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert process.returncode == 130, stderr
    step = int(stderr.split("interrupted at step ")[1].split(";")[0])
    assert 400 <= step < 20000 and (out / f"checkpoint-{step}").is_dir()

    resumed = plop(*args, "--steps", step + 2, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((out / "plop_train_summary.json").read_text())
    assert summary["steps"] == step + 2 and summary["resumed_from"].endswith(f"checkpoint-{step}")


def test_compare_writes_matched_budget_results(tiny, tmp_path):
    report = tmp_path / "report.json"
    diagnose(make_model(), [e.text for e in examples(8)], make_tokenizer()).save(report)
    result = plop("compare", tiny["model"], "--data", tiny["data"], "--report", report,
                  "--placements", "recommended,all-linear", "--steps", 1, "--out", tmp_path / "results.json")
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["placement"] for r in saved["rows"]] == ["recommended", "all-linear"]
    assert all(r["within_budget"] for r in saved["rows"]) and "all-linear" in result.stdout


@pytest.mark.parametrize("extra, message", [
    (["--rank", "0"], "argument --rank: must be a positive whole number, got 0"),  # as every --rank
    (["--lr", "5"], "lr must be in (0, 1]"),
    (["--resume"], "has no checkpoint to resume from"),
    (["--target-modules", "c_attn,c_proj"], "match no linear module of this model (its module types: down_proj"),
    (["--report", "{other_report}"], "the report was made for another model"),
])
def test_errors_are_one_line_with_exit_code_2(tiny, tmp_path, extra, message):
    extra = [e.format(**tiny) for e in extra]
    one_line_error(plop("train", tiny["model"], "--data", tiny["data"], "--output-dir", tmp_path / "run", *extra),
                   message)


def test_an_occupied_output_dir_is_refused(tiny, tmp_path):
    (tmp_path / "run" / "checkpoint-3").mkdir(parents=True)
    one_line_error(plop("train", "--output-dir", tmp_path / "run"), "--resume to continue it, --overwrite")
