"""``plop check`` through the real entry point: exit 0 / 3 by findings, and every unreadable
input one ``plop: error:`` line with exit 2."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from test_cli import ENV, PLOP, one_line_error

pytestmark = pytest.mark.spawns  # each test here starts plop as a process

LLAMA = str(Path(__file__).parent / "fixtures" / "model_configs" / "Llama-3.1-8B.json")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*PLOP, "check", *args], capture_output=True, text=True, env=ENV, timeout=300)


def test_help_lists_check():
    proc = subprocess.run([*PLOP, "--help"], capture_output=True, text=True, env=ENV, timeout=60)
    assert "check" in proc.stdout and "audit any LoRA config" in proc.stdout


def test_clean_exits_0_and_errors_exit_3(tmp_path):
    clean = run("--target-modules", "q_proj,v_proj", LLAMA)
    assert clean.returncode == 0, clean.stderr
    assert "no findings" in clean.stdout
    config = tmp_path / "axolotl.yml"
    config.write_text("base_model: x\nadapter: lora\nlora_r: 8\nlora_alpha: 16\nlora_target_modules: [q_proj, W_pack]\n")
    bad = run(str(config), LLAMA, "--json")
    assert bad.returncode == 3, bad.stderr
    result = json.loads(bad.stdout)
    assert result["exit_code"] == 3 and result["findings"][0]["code"] == "target-miss"
    assert result["trainable_params"] == 32 * 8 * (4096 + 4096)


def test_html_page(tmp_path):
    out = tmp_path / "check.html"
    proc = run("--target-modules", "q_proj", LLAMA, "--html", str(out))
    assert proc.returncode == 0, proc.stderr
    page = out.read_text()
    assert "Content-Security-Policy" in page and "q_proj" in page


@pytest.mark.parametrize("name, content, expected", [
    ("bad.yaml", "lora_target_modules: [q_proj\nlora_r: 8\n", "not valid YAML"),
    ("other.yaml", "learning_rate: 0.0001\nnum_epochs: 3\n", "not a LoRA config plop knows"),
    ("bad.json", "{\"r\": 8,", "not valid JSON"),
])
def test_unreadable_configs(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    assert expected in one_line_error(run(str(path), LLAMA))


def test_one_gigabyte_file_refused_by_size(tmp_path):
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as f:
        f.truncate(1 << 30)  # sparse: nothing is written, and plop must not read it either
    assert os.stat(path).st_blocks * 512 < 1 << 20
    assert "over the 4,194,304-byte limit" in one_line_error(run(str(path), LLAMA))


def test_catastrophic_regex_refused(tmp_path):
    assert "nests unbounded repeats" in one_line_error(run("--target-modules", "(.*a+)+$", LLAMA))
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({"r": 8, "target_modules": "(q|v)_proj", "rank_pattern": {"(a|aa)+$": 4}}))
    assert "backtracks" in one_line_error(run(str(config), LLAMA))


def test_unknown_key_and_missing_model(tmp_path):
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({"r": 8, "target_modules": ["q_proj"], "lora_rank": 8}))
    assert "lora_rank is not a key of peft.LoraConfig" in one_line_error(run(str(config), LLAMA))
    config.write_text(json.dumps({"r": 8, "target_modules": ["q_proj"], "base_model_name_or_path": "org/not-local"}))
    assert "give MODEL" in one_line_error(run(str(config)))
