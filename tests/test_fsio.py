"""plop.utils.fsio under real fault conditions: killed processes, full and read-only filesystems,
symlinks, FIFOs and devices. Nothing is mocked; the filesystem faults need ``unshare -m`` and
``mount`` (root), and are skipped where those are not allowed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from plop.errors import PlopError
from plop.errors import FileError
from plop.utils.fsio import TEMP_MARK, atomic_dir, atomic_write, clean_stale_temps, read_text_capped

ROOT = Path(__file__).resolve().parents[1]
CHILD_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
# Child processes import plop.utils.fsio without running plop/__init__.py, which imports torch (seconds).
CHILD_PRELUDE = f"""
import sys, types
sys.modules["plop"] = types.ModuleType("plop")
sys.modules["plop"].__path__ = [{str(ROOT / "plop")!r}]
"""
UNSHARE = ["unshare", "-m", "--propagation", "private"]  # a private mount namespace


def child(code: str, *args: object) -> list[str]:
    """The command line of a Python child running ``code`` with ``args`` in ``sys.argv``."""
    return [sys.executable, "-c", CHILD_PRELUDE + code, *map(str, args)]


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TEMP_MARK in p.name)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# -- atomic_write --------------------------------------------------------------------------------
def test_atomic_write_writes_text_bytes_and_chunks_and_creates_folders(tmp_path, umask_022):
    out = tmp_path / "a" / "b" / "report.json"
    assert atomic_write(out, "héllo\n") == out
    assert out.read_text(encoding="utf-8") == "héllo\n"
    atomic_write(out, b"\x00bytes")
    assert out.read_bytes() == b"\x00bytes"
    atomic_write(out, (bytes([i]) * 3 for i in range(3)))
    assert out.read_bytes() == b"\x00\x00\x00\x01\x01\x01\x02\x02\x02"
    assert temps(out.parent) == []


def test_atomic_write_gives_usual_permissions_or_the_mode_asked(tmp_path, umask_022):
    out = atomic_write(tmp_path / "r.json", "{}")
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # not mkstemp's 0600
    atomic_write(out, "{}", mode=0o600)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_a_failure_while_writing_leaves_the_old_file_and_no_temp(tmp_path):
    out = tmp_path / "r.json"
    out.write_text("good")

    def chunks():
        yield b"partial"
        raise RuntimeError("the producer failed")

    with pytest.raises(RuntimeError, match="the producer failed"):
        atomic_write(out, chunks())
    assert out.read_text() == "good"
    assert temps(tmp_path) == []


@pytest.mark.parametrize("dangling", [False, True])
def test_a_symlink_destination_is_refused_and_nothing_is_written_through_it(tmp_path, dangling):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    if not dangling:
        victim.write_text("precious")
    link = tmp_path / "out" / "report.json"
    link.parent.mkdir()
    link.symlink_to(victim)
    with pytest.raises(FileError, match="symbolic link"):
        atomic_write(link, "evil")
    assert link.is_symlink() and os.readlink(link) == str(victim)
    assert (victim.read_text() == "precious") if not dangling else not victim.exists()
    assert temps(link.parent) == [] and sorted(os.listdir(outside)) == ([] if dangling else ["victim"])


def test_a_parent_that_is_a_file_is_refused_with_a_clear_message(tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("not a folder")
    with pytest.raises(FileError, match=r"runs is a file, not a folder"):
        atomic_write(blocker / "deep" / "report.json", "{}")
    assert blocker.read_text() == "not a folder"
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileError, match=r"gone is a symbolic link, not a folder"):
        atomic_write(tmp_path / "gone" / "report.json", "{}")


def test_a_directory_destination_is_refused(tmp_path):
    with pytest.raises(FileError, match="it is a directory"):
        atomic_write(tmp_path, "{}")


def test_errors_are_plop_errors_on_one_line(tmp_path):
    weird = tmp_path / "new\nline"
    weird.write_text("x")
    with pytest.raises(PlopError) as caught:
        atomic_write(weird / "r.json", "{}")
    assert "\n" not in str(caught.value) and "new\\x0aline" in str(caught.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions; see the read-only mount test")
def test_a_read_only_folder_by_permissions(tmp_path):
    out = tmp_path / "r.json"
    out.write_text("good")
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(FileError, match="Permission denied"):
            atomic_write(out, "new")
    finally:
        tmp_path.chmod(0o755)
    assert out.read_text() == "good" and temps(tmp_path) == []


# -- faults in a private mount namespace -----------------------------------------------------
# The child mounts a tiny tmpfs in its own namespace (the host sees nothing, and nothing is left
# mounted if the test dies), writes a good report, then tries to replace it on a full or
# read-only filesystem, and prints what it saw.
FS_CHILD = """
import json, os, subprocess, sys
from pathlib import Path
from plop.errors import FileError
from plop.utils.fsio import atomic_write
mnt, fault = Path(sys.argv[1]), sys.argv[2]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "plop-test", str(mnt)], check=True)
atomic_write(mnt / "report.json", "good\\n")
if fault == "readonly":
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
try:
    atomic_write(mnt / "report.json", b"x" * (1 << 20))
    error = None
except FileError as e:
    error = str(e)
print(json.dumps({"error": error, "content": (mnt / "report.json").read_text(), "files": os.listdir(mnt)}))
"""


@pytest.fixture(scope="module")
def private_mounts(tmp_path_factory):
    """Whether this machine lets us mount a tmpfs in a private mount namespace."""
    where = tmp_path_factory.mktemp("probe")
    if shutil.which("unshare") is None:
        pytest.skip("no unshare command")
    probe = subprocess.run([*UNSHARE, "mount", "-t", "tmpfs", "-o", "size=4k", "plop-probe", str(where)],
                           capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.decode().strip()}")


@pytest.mark.spawns
@pytest.mark.parametrize("fault, reason", [("full", "No space left on device"), ("readonly", "Read-only file system")])
def test_a_full_or_read_only_filesystem_keeps_the_old_report(tmp_path, private_mounts, fault, reason):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run([*UNSHARE, *child(FS_CHILD, mnt, fault)], capture_output=True, text=True, timeout=120,
                          env=CHILD_ENV)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["error"] == f"cannot write {mnt}/report.json: {reason}"
    assert seen["content"] == "good\n" and seen["files"] == ["report.json"]


# -- SIGKILL in the middle -------------------------------------------------------------------
# The child starts a save and, once it is under way, says "ready" and waits to be killed: in
# the middle of atomic_write's data (32 MiB written, 32 to go) or of an atomic_dir build.
KILL_CHILD = """
import sys, time
from pathlib import Path
from plop.utils.fsio import atomic_dir, atomic_write

def wait_for_the_kill():
    print("ready", flush=True)
    time.sleep(600)

def chunks():
    for i in range(64):
        if i == 32:
            wait_for_the_kill()
        yield b"x" * (1 << 20)

target, what = Path(sys.argv[1]), sys.argv[2]
if what == "file":
    atomic_write(target, chunks())
else:
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
        wait_for_the_kill()
"""


def kill_mid_save(target: Path, what: str) -> None:
    saver = subprocess.Popen(child(KILL_CHILD, target, what), stdout=subprocess.PIPE, env=CHILD_ENV)
    try:
        assert saver.stdout.readline() == b"ready\n"
        saver.send_signal(signal.SIGKILL)
    finally:
        saver.kill()
        saver.wait(timeout=60)
        saver.stdout.close()
    assert saver.returncode == -signal.SIGKILL


@pytest.mark.spawns
def test_sigkill_during_atomic_write_leaves_the_old_file_and_a_temp_the_next_run_cleans(tmp_path):
    out = tmp_path / "report.json"
    out.write_text("good")
    kill_mid_save(out, "file")
    assert out.read_text() == "good"
    [leftover] = temps(tmp_path)
    assert leftover.startswith(".report.json" + TEMP_MARK)
    assert (tmp_path / leftover).stat().st_size == 32 << 20  # killed halfway through the data
    assert clean_stale_temps(tmp_path) == []  # fresh: maybe another plop's save in progress
    assert clean_stale_temps(tmp_path, older_than=0) == [tmp_path / leftover]
    assert sorted(os.listdir(tmp_path)) == ["report.json"]


@pytest.mark.spawns
def test_sigkill_during_atomic_dir_leaves_no_target_and_a_temp_the_next_run_cleans(tmp_path):
    target = tmp_path / "gguf" / "model-abc"
    kill_mid_save(target, "dir")
    assert not target.exists()
    [leftover] = temps(target.parent)
    assert (target.parent / leftover / "config.json").is_file()
    assert clean_stale_temps(target.parent, older_than=0) == [target.parent / leftover]
    assert os.listdir(target.parent) == []


# -- clean_stale_temps -----------------------------------------------------------------------
def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(item, (then, then), follow_symlinks=False)


def test_clean_stale_temps_removes_only_old_plop_temps(tmp_path):
    keep = [tmp_path / "report.json", tmp_path / ".report.json.abc.tmp", tmp_path / f"x{TEMP_MARK}0123456789abcdef"]
    for path in keep:
        path.write_text("mine")
        age(path, 3600)
    old_file = tmp_path / f".r.json{TEMP_MARK}0123456789abcdef"
    old_file.write_text("partial")
    old_dir = tmp_path / f".model{TEMP_MARK}fedcba9876543210"
    (old_dir / "sub").mkdir(parents=True)
    (old_dir / "sub" / "w.safetensors").write_text("partial")
    for path in (old_file, old_dir):
        age(path, 3600)
    assert sorted(clean_stale_temps(tmp_path)) == sorted([old_file, old_dir])
    assert sorted(tmp_path.iterdir()) == sorted(keep)
    assert clean_stale_temps(tmp_path / "missing") == []


def test_a_temp_folder_still_being_filled_is_not_stale(tmp_path):
    building = tmp_path / f".model{TEMP_MARK}fedcba9876543210"
    building.mkdir()
    age(building, 3600)
    (building / "model.safetensors").write_text("being written now")  # its folder's mtime stays old
    os.utime(building, (time.time() - 3600,) * 2)
    assert clean_stale_temps(tmp_path) == []
    age(building, 3600)
    assert clean_stale_temps(tmp_path) == [building]


# -- atomic_dir ------------------------------------------------------------------------------
def test_atomic_dir_renames_into_place_with_readable_permissions(tmp_path, umask_022):
    target = tmp_path / "cache" / "model"
    with atomic_dir(target) as tmp:
        assert tmp.parent == target.parent and TEMP_MARK in tmp.name
        (tmp / "sub").mkdir(mode=0o700)
        fd = os.open(tmp / "sub" / "weights", os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
        (tmp / "escape").symlink_to(tmp_path / "elsewhere")
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert stat.S_IMODE((target / "sub").stat().st_mode) == 0o755
    assert stat.S_IMODE((target / "sub" / "weights").stat().st_mode) == 0o644
    assert (target / "escape").is_symlink() and temps(target.parent) == []


def test_atomic_dir_removes_its_temp_on_error(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError, match="the build failed"), atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("the build failed")
    assert os.listdir(tmp_path) == []


def test_atomic_dir_keeps_a_concurrent_winner(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("ours")
        target.mkdir()
        (target / "config.json").write_text("theirs")
    assert (target / "config.json").read_text() == "theirs" and temps(tmp_path) == []


def test_atomic_dir_refuses_a_file_or_symlink_target(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileError, match="it is a file"), atomic_dir(tmp_path / "file"):
        pass
    with pytest.raises(FileError, match="symbolic link"), atomic_dir(tmp_path / "link"):
        pass
    assert temps(tmp_path) == []


# -- read_text_capped ------------------------------------------------------------------------
def test_read_text_capped_reads_a_file_up_to_the_limit(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("é" * 50)  # 100 bytes
    assert read_text_capped(path, 100) == "é" * 50
    with pytest.raises(FileError, match=r"r\.json is 100 bytes, over the 99-byte limit"):
        read_text_capped(path, 99)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "report.json"
    os.mkfifo(fifo)  # no writer: a plain open() would block forever
    with pytest.raises(FileError, match=r"is not a regular file \(a FIFO\)"):
        read_text_capped(fifo, 1 << 20)


@pytest.mark.parametrize("path, kind", [("/dev/zero", "a character device"), ("/", "a directory")])
def test_devices_and_folders_are_refused(path, kind):
    with pytest.raises(FileError, match=rf"^{path} is not a regular file \({kind}\)$"):
        read_text_capped(path, 1 << 20)


def test_a_file_that_understates_its_size_is_still_capped():
    maps = Path("/proc/self/maps")  # a regular file whose stat says 0 bytes
    assert maps.stat().st_size == 0
    with pytest.raises(FileError, match="over the 64-byte limit"):
        read_text_capped(maps, 64)


def test_missing_and_binary_files_get_one_line_messages(tmp_path):
    with pytest.raises(FileError, match=r"nothing\.json: no such file$"):
        read_text_capped(tmp_path / "nothing.json", 100)
    (tmp_path / "b.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(FileError, match="not UTF-8 text"):
        read_text_capped(tmp_path / "b.json", 100)


def test_a_device_or_pipe_is_never_replaced(tmp_path):
    """The atomic rename would put a regular file where a FIFO (or /dev/null, as root) was."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(FileError, match="not a regular file"):
        atomic_write(fifo, "x")
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
