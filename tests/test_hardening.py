"""The error contract under hostile input, through the real entry point: every user error is one
line on stderr and exit 2, nothing is written outside its place, and nothing is left half-written."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from plop import Report
from plop.utils.fsio import TEMP_MARK
from test_cli import ENV, PLOP, model_dir, one_line_error, report_path, run, write_jsonl  # noqa: F401 - fixtures

pytestmark = pytest.mark.spawns  # each test here starts plop as a process

ESC = "\x1b"


def _tampered(report_path: Path, tmp_path: Path, edit) -> Path:
    raw = json.loads(report_path.read_text())
    edit(raw)
    path = tmp_path / "tampered.json"
    path.write_text(json.dumps(raw))  # json.dumps writes NaN as the bare word NaN, as a hostile file would
    return path


# -- bad data ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("content", "expected"), [
    ("", "is empty"),
    ('{"text": ["a", "b"]}\n', "row 0: field 'text' holds list, not text"),
    ('{"question": "q", "answer": {"x": 1}}\n', "field 'answer' holds dict"),
])
def test_bad_data_files(model_dir, tmp_path, content, expected):
    data = tmp_path / "d.jsonl"
    data.write_text(content)
    assert expected in one_line_error(run("diagnose", str(model_dir), "--data", str(data), check=None, cwd=tmp_path))
    assert not (tmp_path / "report.json").exists()


def test_a_fifo_is_named_as_such(model_dir, tmp_path):
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    line = one_line_error(run("diagnose", str(model_dir), "--data", str(fifo), check=None, cwd=tmp_path))
    assert "not a regular file (a FIFO)" in line


def _peak_rss_kib(*args: str) -> int:
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *PLOP, *args], capture_output=True, text=True, env=ENV,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stderr.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/usr/bin/time").exists(), reason="needs /usr/bin/time to measure peak RSS")
def test_peak_memory_does_not_follow_a_huge_line(model_dir, tmp_path):
    """Tokenizing a 50 MB line whole took 13 GB for --max-length 64; clipped first, what is left is
    reading the file."""
    rows = [{"text": f"short row {i}"} for i in range(3)]
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": "word " * 100}, *rows])
    big = write_jsonl(tmp_path / "big.jsonl", [{"text": "word " * 10_000_000}, *rows])  # 50 MB, one line
    args = ("diagnose", str(model_dir), "--max-length", "64", "--out", "")
    base = _peak_rss_kib(*args, "--data", str(small))
    huge = _peak_rss_kib(*args, "--data", str(big))
    line_kib = big.stat().st_size // 1024
    assert huge - base < 10 * line_kib, (base, huge)  # unclipped it was ~260x the line


# -- bad models ----------------------------------------------------------------------------------
def _model_copy(model_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    copy.mkdir()
    for f in model_dir.iterdir():
        if f.name != "model.safetensors":
            (copy / f.name).write_bytes(f.read_bytes())
    return copy


def test_truncated_weights(model_dir, tmp_path):
    copy = _model_copy(model_dir, tmp_path)
    weights = (model_dir / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    assert "cannot load model" in one_line_error(run("diagnose", str(copy), "--out", "", check=None))


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {Path(os.environ['PLOP_PWNED'])}",))


def test_a_malicious_pickle_is_refused_and_never_runs(model_dir, tmp_path, monkeypatch):
    copy = _model_copy(model_dir, tmp_path)
    pwned = tmp_path / "pwned"
    monkeypatch.setenv("PLOP_PWNED", str(pwned))
    (copy / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": _Payload()}))
    one_line_error(run("diagnose", str(copy), "--out", "", check=None))
    assert not pwned.exists()


# -- tampered reports ----------------------------------------------------------------------------
@pytest.mark.parametrize(("edit", "expected"), [
    (lambda r: r["modules"][0].update(nfn=float("nan")), "not valid JSON"),
    (lambda r: r["types"][0].update(nfn_mean=float("inf")), "not valid JSON"),
    (lambda r: r["recommendation"].update(rank=-5), "recommendation/rank"),
    (lambda r: r["modules"][0].update(d_in=0), "modules/0/d_in"),
    (lambda r: r["recommendation"].update(target_modules="(a+)+$"), "target_modules"),
])
def test_tampered_reports_are_refused_by_every_reader(report_path, tmp_path, edit, expected):
    bad = _tampered(report_path, tmp_path, edit)
    for command in (["show", str(bad)], ["export", str(bad), "--to", "axolotl"], ["diff", str(bad), str(bad)]):
        assert expected in one_line_error(run(*command, check=None))  # a catastrophic regex is refused unrun


def test_terminal_escapes_and_markup_from_a_report_are_shown_not_obeyed(report_path, tmp_path):
    def edit(r):
        r["model"]["id"] = f"evil{ESC}]0;pwned\a{ESC}[2J"
        r["types"][0]["type"] = "x[/]y"
    bad = _tampered(report_path, tmp_path, edit)
    out = run("show", str(bad))
    assert ESC not in out.stdout and "\a" not in out.stdout
    assert "\\x1b]0;pwned" in out.stdout and "x[/]y" in out.stdout


@pytest.mark.parametrize("target", ["/dev/zero", "FIFO", "HUGE"])
def test_show_never_reads_without_bound(tmp_path, target):
    if target == "FIFO":
        target = tmp_path / "r.json"
        os.mkfifo(target)
    elif target == "HUGE":
        target = tmp_path / "r.json"
        with open(target, "wb") as f:
            f.truncate((64 << 20) + 1)  # sparse: no disk used
    line = one_line_error(run("show", str(target), check=None))
    assert "not a regular file" in line or "over the" in line


# -- writes: never through links, never half, never left behind -----------------------------------
def test_export_never_writes_through_a_symlink(report_path, tmp_path):
    folder = tmp_path / "cfg"
    folder.mkdir()
    outside = tmp_path / "precious.json"
    outside.write_text("keep me")
    (folder / "adapter_config.json").symlink_to(outside)
    assert "symbolic link" in one_line_error(run("export", str(report_path), "--peft", str(folder), check=None))
    assert outside.read_text() == "keep me"


def test_train_refuses_a_dangling_summary_link_before_loading(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "plop_train_summary.json").symlink_to(tmp_path / "outside.json")
    # the model does not exist: had plop tried to load it first, that would be the error
    line = one_line_error(run("train", str(tmp_path / "no-model"), "--output-dir", str(run_dir), "--steps", "1",
                              check=None))
    assert "symbolic link" in line and not (tmp_path / "outside.json").exists()


@pytest.mark.parametrize("where", ["under a file", "a folder in the way"])
def test_unwritable_destinations(report_path, tmp_path, where):
    blocker = tmp_path / "blocker"
    if where == "under a file":
        blocker.write_text("x")
        out = blocker / "page.html"
    else:
        out = blocker
        (blocker / "sub").mkdir(parents=True)
    one_line_error(run("show", str(report_path), "--html", str(out), check=None))


def _mount_tmpfs(folder: Path, options: str) -> list[str]:
    """A command prefix that runs in a private mount namespace with a tmpfs on ``folder``."""
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            f"mount -t tmpfs -o {options} tmpfs {folder}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and unshare)")
    return ["unshare", "-m", "--propagation", "private", "sh", "-c",
            f'mount -t tmpfs -o {options} tmpfs {folder} && exec "$@"', "sh"]


@pytest.mark.parametrize("options", ["size=16k", "ro"])
def test_full_disk_and_read_only_folder(report_path, tmp_path, options):
    folder = tmp_path / "mnt"
    folder.mkdir()
    prefix = _mount_tmpfs(folder, options)
    proc = subprocess.run([*prefix, *PLOP, "show", str(report_path), "--html", str(folder / "report.html")],
                          capture_output=True, text=True, env=ENV, timeout=120)
    line = one_line_error(proc)
    assert ("No space left" in line) if options.startswith("size") else ("Read-only" in line)


def test_a_rerun_removes_what_a_killed_save_left(report_path, tmp_path):
    out = tmp_path / "report.json"
    stale = tmp_path / f".report.json{TEMP_MARK}{'0' * 16}"
    stale.write_text('{"half": ')  # what SIGKILL in the middle of a save leaves
    old = time.time() - 3600
    os.utime(stale, (old, old))
    fresh = tmp_path / f".other.json{TEMP_MARK}{'1' * 16}"  # a save still in progress elsewhere
    fresh.write_text("{")
    Report.load(report_path).save(out)
    assert not stale.exists() and fresh.exists()
    assert Report.load(out) == Report.load(report_path)


# the child presses Ctrl-C on itself the moment plop.cli.options starts importing: deterministic,
# where a parent signalling from outside races the import
_CTRL_C_DURING_IMPORT = """
import os, signal, sys
from importlib.abc import MetaPathFinder

class PressCtrlC(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "plop.cli.options":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, PressCtrlC())
from plop.__main__ import main
sys.argv = ["plop", "show", sys.argv[1]]
sys.exit(main())
"""


def test_ctrl_c_during_start_up_is_one_line(report_path):
    """SIGINT while plop is still importing its modules ends with the one line, not a traceback."""
    proc = subprocess.run([sys.executable, "-c", _CTRL_C_DURING_IMPORT, str(report_path)], capture_output=True,
                          text=True, env=ENV, timeout=60)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1] == "plop: interrupted" and proc.stdout == ""


def test_an_internal_bug_keeps_its_traceback(tmp_path):
    """Only user errors become one line: a bug inside a command (here one that raises a bare
    ValueError, as numpy would) must show its traceback and exit 1, never pass for a user error."""
    code = ("import sys\nfrom plop.cli import main\n"
            "import plop.cli.reports as reports\n"
            "def boom(args):\n    raise ValueError('internal: numpy said no')\n"
            "reports.show = boom\n"
            "sys.exit(main(['show', 'whatever.json']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "internal: numpy said no" in proc.stderr
    assert not re.search(r"^plop: error:", proc.stderr, re.M)


def test_overwrite_removes_a_checkpoint_link_not_what_it_points_to(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Q{i}: ", "response": f"A{i}"} for i in range(8)])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "plop_train_summary.json").write_text("{}")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("keep")
    (run_dir / "checkpoint-7").symlink_to(precious)
    run("train", str(model_dir), "--data", str(data), "--output-dir", str(run_dir), "--overwrite", "--steps", "1",
        "--placement", "qv", "--max-length", "32")
    assert (precious / "keep.txt").read_text() == "keep"
    assert not (run_dir / "checkpoint-7").exists()
    assert json.loads((run_dir / "plop_train_summary.json").read_text())["steps"] == 1
