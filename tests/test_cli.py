"""The real ``plop`` entry point, run in a subprocess: a successful diagnosis, ``show``,
``export``, and every user-error class ending in one stderr line and exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from plop import Report

pytestmark = pytest.mark.spawns  # each test here starts plop as a process

PLOP = [sys.executable, "-m", "plop.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "120", "PYTHONWARNINGS": "ignore"}


def run(*args: str, cwd: Path | None = None, check: int | None = 0,
        address_space: int | None = None) -> subprocess.CompletedProcess:
    """``plop ARGS``; ``address_space`` caps the process's virtual memory in bytes (util-linux's
    prlimit, not a preexec_fn, which is unsafe in a threaded parent), so an allocation past it fails
    in the process instead of waking the kernel's OOM killer, which weighs whatever else the machine holds."""
    limit = ["prlimit", f"--as={address_space}", "--"] if address_space else []
    proc = subprocess.run([*limit, *PLOP, *args], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=300)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The run failed the way plop promises: exit 2, no traceback, one 'plop: error:' line."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("plop: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny LLaMA saved like any local checkpoint (eager attention, so a huge batch really
    allocates its seq x seq scores)."""
    from conftest import make_llama
    from tiny_lm import make_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    model = make_llama()
    model.config.max_position_embeddings = 1 << 17  # rotary positions are computed, not stored
    model.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "attn_implementation": "eager"}))
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def report_path(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.json"
    run("diagnose", str(model_dir), "--samples", "24", "--max-length", "48", "--out", str(out), "--rank", "8")
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- success ------------------------------------------------------------------------------------
def test_diagnose_writes_a_valid_report_and_prints_the_recommendation(model_dir, report_path):
    report = Report.load(report_path)
    assert report.data["samples"] == 24 and report.data["source"] == "demo"
    assert len(report.data["indices"]) == 24 and report.data["sha256"]
    assert report.settings["rank"] == 8
    assert report.recommendation.types and len(report.recommendation.types) == 3
    assert {m.type for m in report.modules} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"}
    shown = run("show", str(report_path))
    assert f"target_modules={report.recommendation.target_modules!r}" in shown.stdout
    for t in report.types:
        assert t.type in shown.stdout


def test_same_seed_same_rows_and_json_to_stdout(model_dir, report_path, tmp_path):
    proc = run("diagnose", str(model_dir), "--samples", "24", "--max-length", "48", "--json", "--out", "",
               "--rank", "8")
    again = json.loads(proc.stdout)
    first = Report.load(report_path)
    assert again["data"]["indices"] == first.data["indices"]
    assert [t["type"] for t in again["types"]] == first.module_types
    assert "target_modules=" in proc.stderr  # the table went to stderr, stdout is pure JSON


def test_until_stable_stops_at_a_stable_recommendation(model_dir, tmp_path):
    out = tmp_path / "auto.json"
    run("diagnose", str(model_dir), "--until-stable", "--max-length", "32", "--out", str(out))
    report = Report.load(out)
    assert report.settings["until_stable"] and report.settings["samples"] == 100  # at most the default rows
    assert report.data["samples"] >= 16
    assert report.recommendation.stable or report.data["samples"] == 100  # stopped only once stable, or at the end


def test_export_writes_a_peft_config(report_path, tmp_path):
    from peft import LoraConfig

    run("export", str(report_path), "--peft", str(tmp_path / "cfg"), "--rank", "4", "--dora")
    config = LoraConfig.from_pretrained(tmp_path / "cfg")
    assert set(config.target_modules) == set(Report.load(report_path).recommendation.target_modules)
    assert config.r == 4 and config.lora_alpha == 8 and config.use_dora


def test_template_and_text_field(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"what is {i} plus {i}?", "answer": str(2 * i),
                                                "note": ""} for i in range(12)])
    out = tmp_path / "r.json"
    run("diagnose", str(model_dir), "--data", str(data), "--template", "Q: {question}\\nA: {answer}",
        "--max-length", "32", "--out", str(out))
    assert Report.load(out).data["format"]["template"] == "Q: {question}\nA: {answer}"
    one_line_error(run("diagnose", str(model_dir), "--data", str(data), "--text-field", "note", "--out", "",
                       check=None))  # every row's text is empty


def test_version_and_help():
    assert run("--version").stdout.strip().startswith("plop ")
    for command in ("diagnose", "show", "export"):
        assert "examples:" in run(command, "--help").stdout
    text = " ".join(run("diagnose", "--help").stdout.split())
    assert "(default: None)" not in text and "tokens per sample (default: 256)" in text


# -- every user error: one line, exit 2, nothing written ------------------------------------------
@pytest.mark.parametrize(
    "args, expected",
    [
        (["--data", "missing.jsonl"], "does not exist"),
        (["--max-length", "0"], "must be a positive whole number"),
        (["--batch-size", "-3"], "must be a positive whole number"),
        (["--samples", "0"], "must be a positive whole number"),
        (["--device", "tpu"], "invalid choice"),
        (["--dtype", "float8"], "invalid choice"),
        (["--rank", "0"], "must be a positive whole number"),
    ],
)
def test_bad_arguments(model_dir, tmp_path, args, expected):
    line = one_line_error(run("diagnose", str(model_dir), *args, check=None, cwd=tmp_path))
    assert expected in line
    assert not (tmp_path / "report.json").exists()


def test_malformed_json_line_is_named(model_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n')
    assert "line 3" in one_line_error(run("diagnose", str(model_dir), "--data", str(data), check=None))


def test_unreadable_file(model_dir, tmp_path):
    data = tmp_path / "rows.parquet"
    data.write_bytes(b"\x00not a parquet file\xff" * 10)
    assert "cannot read" in one_line_error(run("diagnose", str(model_dir), "--data", str(data), check=None))


def test_missing_field_lists_the_available_ones(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"title": "a", "body": "b"}])
    line = one_line_error(run("diagnose", str(model_dir), "--data", str(data), "--text-field", "content",
                              check=None))
    assert "'content'" in line and "title, body" in line


def test_more_samples_than_rows_warns_and_uses_all(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"row number {i}"} for i in range(5)])
    proc = run("diagnose", str(model_dir), "--data", str(data), "--samples", "50", "--out", str(tmp_path / "r.json"))
    assert "using all of them" in proc.stderr
    assert Report.load(tmp_path / "r.json").data["samples"] == 5


def test_model_not_found_says_the_hub_is_offline(tmp_path):
    line = one_line_error(run("diagnose", "no-such-org/no-such-model", check=None, cwd=tmp_path))
    assert "not found" in line and "offline" in line


def test_not_a_model_directory(tmp_path):
    assert "no config.json" in one_line_error(run("diagnose", str(tmp_path), check=None))


def test_model_without_linear_modules(model_dir, tmp_path):
    """A custom architecture (trust_remote_code) made of an embedding and a norm only."""
    path = tmp_path / "nolinear"
    path.mkdir()
    (path / "modeling_nolinear.py").write_text(
        "import torch\n"
        "from transformers import PretrainedConfig, PreTrainedModel\n"
        "class NoLinearConfig(PretrainedConfig):\n"
        "    model_type = 'nolinear'\n"
        "class NoLinearModel(PreTrainedModel):\n"
        "    config_class = NoLinearConfig\n"
        "    def __init__(self, config):\n"
        "        super().__init__(config)\n"
        "        self.embed = torch.nn.Embedding(config.vocab_size, 8)\n"
        "        self.norm = torch.nn.LayerNorm(8)\n"
        "        self.post_init()\n"
        "    def get_input_embeddings(self):\n"
        "        return self.embed\n"
        "    def forward(self, input_ids, attention_mask=None):\n"
        "        return self.norm(self.embed(input_ids))\n"
    )
    (path / "config.json").write_text(json.dumps({
        "model_type": "nolinear", "vocab_size": 400, "architectures": ["NoLinearModel"],
        "auto_map": {"AutoConfig": "modeling_nolinear.NoLinearConfig", "AutoModel": "modeling_nolinear.NoLinearModel"},
    }))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, path / name)
    save_file({"embed.weight": torch.randn(400, 8), "norm.weight": torch.ones(8), "norm.bias": torch.zeros(8)},
              path / "model.safetensors", metadata={"format": "pt"})
    line = one_line_error(run("diagnose", str(path), check=None))
    assert "trust_remote_code" in line or "trust-remote-code" in line  # off by default, and said so
    line = one_line_error(run("diagnose", str(path), "--trust-remote-code", check=None))
    assert "no linear modules" in line


@pytest.mark.skipif(torch.cuda.is_available() or shutil.which("prlimit") is None,
                    reason="the address-space cap needs util-linux's prlimit, and CUDA reserves more than it")
def test_out_of_memory_suggests_smaller_batches(model_dir, tmp_path):
    """One 60k-token sample makes eager attention ask for a 60k x 60k score matrix per head."""
    data = write_jsonl(tmp_path / "long.jsonl", [{"text": "the cat sat on the mat " * 20000}])
    line = one_line_error(run("diagnose", str(model_dir), "--data", str(data), "--max-length", "60000",
                              "--out", str(tmp_path / "r.json"), check=None, address_space=8 << 30))
    assert "out of memory" in line and "--batch-tokens" in line and "--batch-size" in line
    assert not (tmp_path / "r.json").exists()


def test_failed_run_keeps_the_existing_report(model_dir, report_path, tmp_path):
    good = tmp_path / "report.json"
    shutil.copy(report_path, good)
    before = good.read_bytes()
    data = write_jsonl(tmp_path / "d.jsonl", [{"title": "x"}])
    one_line_error(run("diagnose", str(model_dir), "--data", str(data), "--text-field", "text", "--out", str(good),
                       check=None))
    assert good.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "report.json"]  # no temp files left


def test_show_rejects_a_broken_report(tmp_path):
    bad = tmp_path / "r.json"
    bad.write_text('{"schema": "plop.report", "schema_version": 1}')
    assert "not a valid plop report" in one_line_error(run("show", str(bad), check=None))
    assert "no such file" in one_line_error(run("show", str(tmp_path / "none.json"), check=None))
