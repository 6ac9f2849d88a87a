"""What a new user hit, fixed: everything checkable without the model fails before it loads, and
the rough edges found by trying plop as a newcomer would."""

from __future__ import annotations

import json
import subprocess
import sys

import archs
import pytest
from conftest import make_batches
from rich.console import Console
from tiny_lm import save_tiny, write_jsonl

from plop import diagnose
from plop.cli import main
from plop.errors import ModelError

pytestmark = pytest.mark.spawns  # each test here starts plop as a process

PROBE = ("import sys\nfrom plop.cli import main\ncode = main({argv!r})\n"
         "print('\\nRESULT', code, sorted(m for m in ('torch', 'transformers', 'plop.model.loading') if m in sys.modules))")


def _run_and_list_imports(argv: list[str]) -> tuple[str, str]:
    result = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True,
                            timeout=120)
    return result.stdout.rstrip().splitlines()[-1], result.stderr


@pytest.mark.parametrize("data, expected", [
    ('{"task_id": 1, "canonical_solution": "x"}\n', "cannot tell which fields hold the text"),  # humaneval's fields
    ("not json\n", "malformed JSON at line 1"),
])
def test_a_bad_data_file_fails_before_the_model_loader_is_even_imported(tmp_path, data, expected):
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + b"\0" * 64)  # loading it would fail, and take torch
    (tmp_path / "data.jsonl").write_text(data)
    result, stderr = _run_and_list_imports(["diagnose", str(tmp_path / "model.gguf"), "--data",
                                            str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "r.json")])
    assert result == "RESULT 2 []" and expected in stderr


@pytest.mark.parametrize("argv, expected", [
    (["--template", "Q: {question}"], "template field 'question' is not in the data"),
    (["--text-field", "body"], "field 'body' is not in the data"),
    (["--out", "OUTDIR"], "it is a directory"),
    (["--plot", "LINK"], "symbolic link"),
])
def test_fields_templates_and_outputs_are_checked_before_the_model(tmp_path, argv, expected):
    (tmp_path / "outdir").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere.png")
    data = write_jsonl(tmp_path / "d.jsonl", 8)
    argv = [{"OUTDIR": str(tmp_path / "outdir"), "LINK": str(tmp_path / "link")}.get(a, a) for a in argv]
    result, stderr = _run_and_list_imports(["diagnose", str(tmp_path / "no-such-model"), "--data", str(data),
                                            *argv])
    assert result == "RESULT 2 []" and expected in stderr


def test_until_stable_on_a_short_file_does_not_warn_about_what_was_not_asked(tmp_path, recwarn):
    model, data = save_tiny(tmp_path / "m"), write_jsonl(tmp_path / "d.jsonl", 40)
    assert main(["diagnose", str(model), "--data", str(data), "--until-stable", "--out", str(tmp_path / "r.json"),
                 "--max-length", "32"]) == 0
    assert not [w for w in recwarn if "asked for" in str(w.message)]
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["until_stable"] is True
    assert main(["diagnose", str(model), "--data", str(data), "--samples", "60", "--out", "",
                 "--max-length", "32"]) == 0  # asked for more than there is: that is worth a word
    assert [str(w.message) for w in recwarn if "asked for" in str(w.message)] == [
        "asked for 60 samples but the data has 40 rows; using all of them"]


def test_an_encoder_decoder_without_a_decoder_start_token_is_one_clear_error():
    model = archs.build("t5")
    del model.config.decoder_start_token_id
    with pytest.raises(ModelError, match="no decoder_start_token_id"):
        diagnose(model, make_batches(4, 8, vocab=archs.SAFE_VOCAB), n_bootstrap=5)


def test_the_ranking_table_keeps_every_header_whole_at_80_columns(tiny_llama):
    report = diagnose(tiny_llama, make_batches(8, 16), n_bootstrap=10, rank=16)
    console = Console(width=80, record=True)
    console.print(report)
    header = next(line for line in console.export_text().splitlines() if "NFN ± std" in line)
    assert header.rstrip().endswith("params@r16") and "…" not in header
