"""Replace a directory in one step: a reader (or a crash) sees all of its old files or all
of its new ones, never a mix.

``with atomic_directory(path) as tmp:`` gives a fresh temporary sibling of ``path``; write
the new files there. On a normal exit every file and the directory are fsynced and the two
directories are swapped: on Linux with ``renameat2(RENAME_EXCHANGE)``, one atomic step;
elsewhere (or on a filesystem without it) with two renames, ``path -> .<name>.eqxtl-old-<pid>``
then ``tmp -> path``. A process killed between those two renames leaves no ``path`` but a
whole old copy: ``recover(path)``, run by the next ``atomic_directory`` on that path (and
by readers that want to), moves it back, and removes what killed writers left behind.

Only the standard library is imported here (tests load this file alone in subprocesses
that they kill at each step).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

_step_hook: Callable[[str], None] | None = None
"""Called with the name of each step (``"created"``, ``"written"``, ``"synced"``,
``"moved-old"``, ``"swapped"``); tests set it to kill the process there."""


def _step(name: str) -> None:
    if _step_hook is not None:
        _step_hook(name)


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.eqxtl-tmp-"


def _old_prefix(path: Path) -> str:
    return f".{path.name}.eqxtl-old-"


def _renameat2():
    """libc's ``renameat2`` (glibc >= 2.28), or ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; ``False`` where the system cannot."""
    if _RENAMEAT2 is None:
        return False
    ok = _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if ok == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(b))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process, say: leave its files alone
        return True
    return True


def _pid_of(entry: Path, prefix: str) -> int | None:
    head = entry.name[len(prefix) :].split("-", 1)[0]
    return int(head) if head.isdigit() else None


def recover(path: str | os.PathLike) -> None:
    """Repair what a killed ``atomic_directory(path)`` left: when ``path`` is missing and a
    whole old copy waits beside it, move the copy back; remove leftover old copies and
    temporary directories of processes that no longer run."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for prefix in (_old_prefix(path), _tmp_prefix(path)):
        for entry in sorted(path.parent.glob(prefix + "*")):
            pid = _pid_of(entry, prefix)
            if pid is None or _alive(pid):
                continue
            if prefix == _old_prefix(path) and not os.path.lexists(path):
                os.rename(entry, path)  # killed between the two renames: the old copy is whole
            else:
                shutil.rmtree(entry, ignore_errors=True)


def _fsync(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync(Path(dirpath, name))
        _fsync(Path(dirpath), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _link_tree(src: Path, dst: Path, skip: set[str]) -> None:
    """Hard links (copies where links fail) to every entry of ``src`` not in ``skip``."""
    for entry in src.iterdir():
        if entry.name in skip:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, dst / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, dst / entry.name)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _swap(new: Path, path: Path) -> Path | None:
    """Put ``new`` at ``path``; return where the old directory now is (``None``: none)."""
    if not os.path.lexists(path):
        os.rename(new, path)
        return None
    if _exchange(new, path):
        return new
    old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{_old_prefix(path)}{os.getpid()}-"))
    os.rename(path, old)  # over the empty directory mkdtemp made
    try:
        _step("moved-old")
        os.rename(new, path)
    except BaseException:
        os.rename(old, path)
        raise
    return old


@contextlib.contextmanager
def atomic_directory(
    path: str | os.PathLike, *, replacing: Iterable[str] | None = None
) -> Iterator[Path]:
    """Write a directory's new contents into the yielded temporary directory; on a normal
    exit they replace ``path`` in one step (see the module docstring). On an exception
    ``path`` is left as it was and the temporary directory is removed.

    **Arguments:**

    - `path`: the directory to write; its parent is created if needed.
    - `replacing`: ``None`` replaces the whole directory. A list of names replaces only
      those: the temporary directory starts with hard links to every other entry already
      in ``path`` (copies where links fail), so those survive the swap. Write only the
      listed names then (writing into a linked file would change the old copy too).
    """
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():  # never replace a user's file
        raise FileExistsError(
            f"{path} exists and is not a directory; refusing to replace it with one. "
            "Choose another path, or move the file away."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{_tmp_prefix(path)}{os.getpid()}-"))
    old = None
    try:
        if replacing is not None and path.is_dir():
            _link_tree(path, tmp, set(replacing))
        _step("created")
        yield tmp
        _step("written")
        _fsync_tree(tmp)
        _step("synced")
        old = _swap(tmp, path)
        _fsync(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        _step("swapped")
    finally:
        for leftover in (tmp, old):  # the unused new copy, or the replaced old one
            if leftover is not None and leftover != path:
                shutil.rmtree(leftover, ignore_errors=True)
