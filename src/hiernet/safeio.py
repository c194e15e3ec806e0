"""Safe file handling: atomic writes, folder swaps, locks, and an allow-list unpickler.

Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import pickle
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


class UserError(Exception):
    """An error caused by the user's input; scripts print ``str(err)`` as one line and exit non-zero.

    Parameters
    ----------
    message : str
        What is wrong and what to do, in one line.
    arg : str, optional
        The library parameter whose value is wrong (e.g. ``"out_dir"``); a script names its own flag
        for it with :meth:`for_flags`, so library messages need not know the command line.
    """

    def __init__(self, message: str, arg: str | None = None):
        super().__init__(message)
        self.arg = arg

    def for_flags(self, flags: dict[str, str]) -> "UserError":
        """This error with the command-line flag that set :attr:`arg` in front (``flags``: arg → flag)."""
        flag = flags.get(self.arg or "")
        return UserError(f"{flag}: {self}", self.arg) if flag else self


# --------------------------------------------------------------------------------------------- writes
def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` would race with other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path``.

    On an exception (or a kill) the old ``path`` is left as it was and the temporary file is removed
    (or, after ``kill -9``, left behind under a ``.tmp-`` name that nothing reads).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:  # mkstemp makes 0600 files; give the result the mode a plain open() would have
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename.

    File names that are not UTF-8 reach Python as lone surrogates (``"caf\\udce9.jpg"``); they are
    written as ``\\udce9`` escapes, so the file stays valid UTF-8 (and valid JSON) instead of failing.
    """
    write_bytes_atomic(path, text.encode("utf-8", "backslashreplace"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON through a temporary file and a rename."""
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


_RENAME_EXCHANGE = 2  # linux/fs.h: swap two paths atomically


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns ``False`` where the C library, kernel or file system does not offer it.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _recover_dir(target: Path) -> None:
    """Undo what a kill between the two renames of the fallback swap left: the old folder only aside."""
    aside = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if aside and not os.path.lexists(target):
        os.replace(aside[-1], target)  # the newest one aside was at ``target`` last


def _rmtree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def replace_dir(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished folder ``staging`` to ``target``, replacing an older ``target``.

    ``staging`` must be on the file system of ``target`` (e.g. a hidden sibling, or a folder inside
    the same parent). Where Linux offers it the two are exchanged in one atomic step, so a process
    killed at any moment leaves the complete old or the complete new folder at ``target``. Elsewhere
    the old folder is renamed aside to ``.<name>.old-<pid>`` first; a kill between that rename and
    the next leaves no ``target`` for an instant, and the next call (or :func:`remove_stale`) puts
    the old folder back. Old folders left aside by earlier crashed calls
    are deleted once the new one is in place; the old contents are deleted last.
    """
    staging, target = Path(staging), Path(target)
    _recover_dir(target)
    if not os.path.lexists(target):
        os.replace(staging, target)
        old = None
    elif _exchange(staging, target):
        old = staging  # now holds the old contents
    else:
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        _rmtree(old)
        os.replace(target, old)
        os.replace(staging, target)
    for p in target.parent.glob(f".{target.name}.old-*"):
        _rmtree(p)
    if old is not None:
        _rmtree(old)


def remove_stale(parent: Path, name: str) -> None:
    """Delete leftovers (``.<name>.tmp-*`` / ``.old-*`` / ``.staging-*``) of an interrupted earlier run.

    A folder that a killed :func:`replace_dir` had moved aside while ``parent/name`` is missing is put
    back first, not deleted.
    """
    _recover_dir(parent / name)  # a folder moved aside by a killed swap is not a leftover
    for pattern in (f".{name}.tmp-*", f".{name}.old-*", f".{name}.staging-*"):
        for p in parent.glob(pattern):
            _rmtree(p)


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- locks
class LockHeld(UserError):
    """Another process holds the lock."""


#: Set to 1 to skip the ``flock`` locks (filesystems without working locks; then never start two
#: trainings of one node at once).
NO_LOCK_ENV = "HIERNET_NO_LOCK"
#: ``flock`` errors that mean "this filesystem cannot lock" (some NFS / Lustre / GPFS mounts), not "held".
_NO_LOCK_ERRNOS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, getattr(errno, "ENOTSUP", -1)}


@contextlib.contextmanager
def exclusive_lock(lock_file: Path, what: str) -> Iterator[None]:
    """Hold an exclusive, non-blocking ``flock`` on ``lock_file`` for the ``with`` block.

    The kernel drops the lock when the process dies (even by ``kill -9``), so a crash never leaves a
    stale lock. Raises :class:`LockHeld` if another process holds it. Where the filesystem cannot lock
    (or with ``HIERNET_NO_LOCK=1``) the block runs unlocked, with a warning.
    """
    import logging

    if os.environ.get(NO_LOCK_ENV, "") not in ("", "0"):
        yield
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fh, locked = open(lock_file, "a+"), False
    try:
        try:
            fh = _flock_current(fh, lock_file)
            locked = True
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise LockHeld(
                    f"{what} is already running in another process (lock {lock_file}); "
                    "wait for it to finish, then run again"
                ) from None
            if exc.errno not in _NO_LOCK_ERRNOS:
                raise
            logging.getLogger(__name__).warning(
                "%s cannot be locked on this filesystem (%s); running %s without a lock (set %s=1 to skip locking)",
                lock_file, os.strerror(exc.errno), what, NO_LOCK_ENV)
        else:
            fh.seek(0)
            fh.truncate()
            fh.write(str(os.getpid()))
            fh.flush()
        yield
    finally:
        if locked:  # removed while still held: no lock file is left behind in the user's folders
            with contextlib.suppress(OSError):
                os.unlink(lock_file)
        fh.close()


def _flock_current(fh, lock_file: Path):
    """``flock`` ``fh`` (non-blocking) and make sure it is still the file at ``lock_file``: a holder that
    finished may have removed it after we opened it, then we lock the file now there instead."""
    while True:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        mine = os.fstat(fh.fileno())
        try:
            now = os.stat(lock_file)
        except FileNotFoundError:
            now = None
        if now is not None and (now.st_ino, now.st_dev) == (mine.st_ino, mine.st_dev):
            return fh
        fh.close()
        fh = open(lock_file, "a+")


# --------------------------------------------------------------------------------------------- pickles
#: Globals a pickle written by this suite may name. Anything else is refused before it is imported.
SAFE_PICKLE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("builtins", "dict"),
        ("builtins", "list"),
        ("builtins", "tuple"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "int"),
        ("builtins", "float"),
        ("builtins", "str"),
        ("builtins", "bool"),
        ("collections", "OrderedDict"),
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only resolves globals in an allow-list; all others raise ``UnpicklingError``."""

    def __init__(self, file: io.BufferedIOBase, allowed: frozenset[tuple[str, str]] = SAFE_PICKLE_GLOBALS):
        super().__init__(file)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle API
        import _compat_pickle

        # Protocol 0-2 pickles name Python 2 modules ("__builtin__.set"); map them as pickle does,
        # check the result, and import exactly the name that was checked.
        key = (module, name)
        if key in _compat_pickle.NAME_MAPPING:
            key = _compat_pickle.NAME_MAPPING[key]
        elif module in _compat_pickle.IMPORT_MAPPING:
            key = (_compat_pickle.IMPORT_MAPPING[module], name)
        if key not in self._allowed:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")
        return super().find_class(*key)


def restricted_load(path: str | os.PathLike, allowed: frozenset[tuple[str, str]] = SAFE_PICKLE_GLOBALS) -> Any:
    """Unpickle ``path`` allowing only plain data (see :data:`SAFE_PICKLE_GLOBALS`).

    Raises
    ------
    pickle.UnpicklingError
        If the file names any other global (e.g. ``os.system``) or is not a valid pickle.
    """
    with open(path, "rb") as fh:
        try:
            return RestrictedUnpickler(fh, allowed).load()
        except pickle.UnpicklingError:
            raise
        except Exception as exc:  # truncated / garbage files raise many types
            raise pickle.UnpicklingError(f"not a valid pickle ({type(exc).__name__}: {exc})") from None


def pickle_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Pickle ``obj`` to ``path`` through a temporary file and a rename."""
    write_bytes_atomic(path, pickle.dumps(obj, protocol=4))


def run_cli(main: Callable[[], Any]) -> None:
    """Run a script's ``main``; a :class:`UserError` becomes one line on stderr and exit code 2.

    ``KeyboardInterrupt`` exits with 130 and a one-line message, never a traceback.
    """
    import sys

    try:
        rc = main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: earlier results are left as they were", file=sys.stderr)
        sys.exit(130)
    sys.exit(rc or 0)


# --------------------------------------------------------------------------------------------- outputs
def output_kind(path: str | os.PathLike | None) -> str:
    """How :func:`open_output` would write ``path``: ``stdout``, ``file`` (a regular file or a new
    name: temporary file and rename), ``stream`` (a device, FIFO or socket: written through) or ``dir``.

    Symlinks are followed: the kind is the kind of the file they name.
    """
    if path is None or os.fspath(path) == "-":
        return "stdout"
    try:
        mode = os.stat(path).st_mode  # follows symlinks
    except FileNotFoundError:
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    return "file" if stat.S_ISREG(mode) else "stream"


def check_output_path(path: str | os.PathLike | None, flag: str = "-o") -> None:
    """Refuse an output path that names a folder (call it before any long work).

    Raises
    ------
    UserError
        ``path`` (or the file a symlink names) is a folder.
    """
    if output_kind(path) == "dir":
        raise UserError(f"{flag} {Path(path).resolve()} is a folder; give a file name (e.g. {Path(path) / 'predictions.csv'})")


@contextlib.contextmanager
def open_output(path: str | os.PathLike | None, append: bool = False, encoding: str = "utf-8") -> Iterator[Any]:
    """Open what an ``-o/--output`` flag names for writing text; closes it (never standard output).

    - ``None`` or ``"-"``: standard output;
    - a symlink: the file it names (the link stays a link);
    - a device, FIFO or socket: written through, never replaced;
    - a regular file or a new name: written to a temporary file beside it, renamed over it on success
      (an earlier file is kept as it was if the block fails); with ``append`` the file itself is
      opened for appending (created if missing), for resumable outputs that sync as they go.

    Text is written with ``errors="backslashreplace"`` (file names that are not UTF-8 stay readable)
    and no newline translation.

    Raises
    ------
    UserError
        ``path`` is a folder.
    """
    import sys

    kind = output_kind(path)
    if kind == "stdout":
        yield sys.stdout
        return
    if kind == "dir":
        check_output_path(path)
    target = Path(os.path.realpath(path))
    opts = dict(encoding=encoding, errors="backslashreplace", newline="")
    if kind == "stream" or append:
        if append:
            target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "a" if append else "w", **opts) as fh:
            yield fh
        return
    with atomic_path(target) as tmp, open(tmp, "w", **opts) as fh:
        yield fh
