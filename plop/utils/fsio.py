"""Every file plop writes or reads from the user goes through here.

Writes are atomic: the data goes into a temporary file beside the destination (named
``.<name>.plop-tmp-<random>``, so it is recognisable), is flushed to disk, and is renamed into
place. A failed or killed run therefore never leaves a half-written report or replaces a good
one; the most it leaves is a temp file, which :func:`clean_stale_temps` removes on the next run.
Reads are capped, so a FIFO, ``/dev/zero`` or a huge file cannot hang plop or fill its memory.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import FileError
from .untrusted import plain_safe

TEMP_MARK = ".plop-tmp-"
_TEMP_NAME = re.compile(r"\..+" + re.escape(TEMP_MARK) + r"[0-9a-f]{16}", re.DOTALL)
_KINDS = {stat.S_IFREG: "a file", stat.S_IFDIR: "a directory", stat.S_IFLNK: "a symbolic link", stat.S_IFIFO: "a FIFO",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def _show(path: Path) -> str:
    """The path as it may appear in a one-line message (a newline in a file name stays visible)."""
    return plain_safe(str(path))


def kind_of(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "of an unknown kind")


def _temp_path(target: Path) -> Path:
    return target.with_name(f".{target.name}{TEMP_MARK}{secrets.token_hex(8)}")


def _umask() -> int:
    """The process's umask; it can only be read by setting it, so it is set back at once."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_destination(path: str | os.PathLike | None, *, folder: bool = False) -> None:
    """Refuse a destination a plain ``open`` would mishandle (nothing to check for ``None`` or ``""``).
    Commands call it on their output paths before any slow work, and every write calls it again.

    ``folder``: the destination is a folder (an existing one is left for :func:`atomic_dir` to
    handle), else a file (an existing folder there is refused).

    A symlink is refused rather than replaced or followed: replacing it would surprise the user,
    following it lets whoever planted it choose where plop writes. The rename that finally puts
    the file in place never follows a link either, so a link planted after this check is
    replaced, and nothing is written outside.
    """
    if not path:
        return
    target = Path(path)
    if target.is_symlink():
        raise FileError(f"{_show(target)} is a symbolic link; plop does not write through links",
                        "remove it or choose another path")
    if target.exists() and target.is_dir() != folder:
        raise FileError(f"cannot write {_show(target)}: it is {'a file' if folder else 'a directory'}")
    if target.exists() and not folder and not target.is_file():  # the rename would replace a device or a pipe
        raise FileError(f"cannot write {_show(target)}: it is {kind_of(target.stat().st_mode)}, not a regular file")
    for parent in target.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                kind = kind_of(parent.lstat().st_mode)
                raise FileError(f"cannot write {_show(target)}: {_show(parent)} is {kind}, not a folder")
            break


def _prepare(target: Path, *, folder: bool) -> None:
    """:func:`check_destination`, then create the parent folders."""
    check_destination(target, folder=folder)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FileError(f"cannot create the folder {_show(target.parent)}: {e.strerror}") from e


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a no-op where folders cannot be opened, e.g. Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, data: str | bytes | Iterable[bytes], *, mode: int | None = None) -> Path:
    """Write ``data`` (text as UTF-8, bytes, or an iterable of byte chunks) to ``path`` atomically.

    The file gets the user's usual permissions (``0o666 & ~umask``), or exactly ``mode``. On any
    failure the temp file is removed and ``path`` is untouched; ``OSError`` becomes a
    :class:`FileError` (disk full, read-only folder) so the CLI reports it on one line.
    """
    target = Path(path)
    _prepare(target, folder=False)
    clean_stale_temps(target.parent)  # what a killed earlier write left here
    tmp = _temp_path(target)
    if isinstance(data, str):
        data = data.encode("utf-8")
    chunks = [data] if isinstance(data, bytes) else data
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(tmp, flags, 0o666)  # the kernel applies the umask
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(OSError):  # e.g. never created, on a read-only filesystem
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise FileError(f"cannot write {_show(target)}: {e.strerror or e}") from e
        raise
    _fsync_dir(target.parent)
    return target


def _newest_mtime(path: Path) -> float:
    """The latest modification under ``path``: a folder someone is still filling looks fresh."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def clean_stale_temps(folder: str | os.PathLike, older_than: float = 60.0) -> list[Path]:
    """Remove plop's temp files and folders in ``folder`` untouched for ``older_than`` seconds.

    A save killed outright (SIGKILL, power loss) cannot clean up after itself; the next run does.
    The age threshold spares the temps of a plop that is writing right now. Returns what was
    removed; a missing folder, or a temp that vanishes meanwhile, is not an error.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    now = time.time()
    for entry in folder.iterdir():
        if not _TEMP_NAME.fullmatch(entry.name):
            continue
        try:
            if now - _newest_mtime(entry) < older_than:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:
            continue
        removed.append(entry)
    return removed


def _open_permissions(folder: Path) -> None:
    """Give a folder built under ``mkdtemp``'s private 0700 the user's usual permissions
    (``0o777``/``0o666 & ~umask``: 0755 and 0644 for the common umask), so a shared cache is
    readable by the group and others as the rest of the user's files are."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            item = os.path.join(root, name)
            if not os.path.islink(item):  # chmod would follow it out of the folder
                os.chmod(item, (0o777 if name in dirs else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Build a folder under a temp name beside ``target``; rename it into place on success.

    On an exception the temp folder is removed and ``target`` untouched. If ``target`` is a
    non-empty folder by the time the build ends (a concurrent plop built the same cache), that
    one is kept and ours discarded: callers check that a complete ``target`` is absent first.
    """
    target = Path(target)
    _prepare(target, folder=True)
    tmp = _temp_path(target)
    try:
        tmp.mkdir(mode=0o700)
    except OSError as e:
        raise FileError(f"cannot create {_show(tmp)}: {e.strerror}") from e
    try:
        yield tmp
        _open_permissions(tmp)
        try:
            os.replace(tmp, target)
        except OSError as e:
            if not target.is_dir():
                raise FileError(f"cannot create {_show(target)}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_text_capped(path: str | os.PathLike, limit_bytes: int) -> str:
    """The UTF-8 text of a regular file of at most ``limit_bytes``; anything else is a :class:`FileError`.

    The file is opened non-blocking and checked with ``fstat`` on the open descriptor, so a FIFO
    cannot block the open and cannot be swapped in after the check; at most ``limit_bytes + 1``
    bytes are read, so a file that grows or lies about its size (``/proc``) cannot exhaust memory.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileError(f"{_show(path)}: no such file") from None
    except OSError as e:
        raise FileError(f"cannot read {_show(path)}: {e.strerror or e}") from e
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileError(f"{_show(path)} is not a regular file ({kind_of(info.st_mode)})")
        if info.st_size > limit_bytes:
            raise FileError(f"{_show(path)} is {info.st_size:,} bytes, over the {limit_bytes:,}-byte limit")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit_bytes + 1)
    except OSError as e:
        raise FileError(f"cannot read {_show(path)}: {e.strerror or e}") from e
    finally:
        os.close(fd)
    if len(data) > limit_bytes:
        raise FileError(f"{_show(path)} is over the {limit_bytes:,}-byte limit")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise FileError(f"{_show(path)} is not UTF-8 text (a binary file?)") from None
