"""hiernet.safeio: atomic writes, folder swaps, locks, the allow-list unpickler and run_cli."""

from __future__ import annotations

import collections
import os
import pickle
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO, Payload, readline_within
from hiernet.safeio import (
    LockHeld,
    RestrictedUnpickler,
    UserError,
    atomic_path,
    exclusive_lock,
    pickle_atomic,
    remove_stale,
    replace_dir,
    restricted_load,
    run_cli,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)


# ------------------------------------------------------------------------------ the unpickler
@pytest.mark.parametrize("obj", [
    {0: "a"},
    {0: "shirt", 1: "t-shirt", 2: "中文"},
    collections.OrderedDict([(1, "x")]),
    [1, 2.5, "s", None, True, (1, 2), {3}, frozenset({4}), {"k": [-7]}],
])
@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_plain_data_loads(tmp_path, obj, protocol):
    p = tmp_path / "enc.pickle"
    p.write_bytes(pickle.dumps(obj, protocol=protocol))
    assert restricted_load(p) == obj


def _marker_cmd(marker: Path) -> str:
    return f"touch '{marker}'"


def payloads(marker: Path) -> dict[str, bytes]:
    """Real pickles that run code when unpickled by ``pickle.load``; each would create ``marker``."""
    import builtins
    import subprocess as sp

    code = f"open({str(marker)!r}, 'w').write('pwned')"
    out = {
        "os.system": pickle.dumps(Payload(os.system, _marker_cmd(marker))),  # pickled as posix.system
        "subprocess.Popen": pickle.dumps(Payload(sp.Popen, ["touch", str(marker)])),
        "builtins.eval": pickle.dumps(Payload(builtins.eval, code)),
        "builtins.exec": pickle.dumps(Payload(builtins.exec, code), protocol=2),
        "nested in a dict": pickle.dumps({0: "a", 1: Payload(os.system, _marker_cmd(marker))}),
        # hand-written protocol-0 pickle naming os.system literally (GLOBAL opcode)
        "os.system protocol 0": b"cos\nsystem\n(V" + _marker_cmd(marker).encode() + b"\ntR.",
        # protocol 4 STACK_GLOBAL for os.system
        "os.system STACK_GLOBAL": (b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x93\x94\x8c"
                                   + bytes([len(_marker_cmd(marker))]) + _marker_cmd(marker).encode()
                                   + b"\x94\x85\x94R\x94."),
        # allowed globals only, but used to reach code: getattr is not allowed
        "builtins.getattr": pickle.dumps(Payload(getattr, str, "join")),
        "importlib": pickle.dumps(Payload(__import__("importlib").import_module, "os")),
    }
    return out


def test_payloads_really_run_with_plain_pickle(tmp_path):
    """Sanity check of the test itself: the payloads do run under an unrestricted unpickler."""
    marker = tmp_path / "MARKER"
    for name in ("os.system", "builtins.exec", "os.system protocol 0", "os.system STACK_GLOBAL"):
        pickle.loads(payloads(marker)[name])
        assert marker.exists(), name
        marker.unlink()


@pytest.mark.parametrize("name", sorted(payloads(Path("/x"))))
def test_code_carrying_pickles_are_refused_and_never_run(tmp_path, name):
    marker = tmp_path / "MARKER"
    p = tmp_path / "encoder.pickle"
    p.write_bytes(payloads(marker)[name])
    with pytest.raises(pickle.UnpicklingError, match="is not allowed"):
        restricted_load(p)
    assert not marker.exists()


@pytest.mark.parametrize("data", [b"", b"\x80", b"garbage", pickle.dumps({0: "a"})[:-3], b"\x80\x04\x95" + b"\xff" * 20])
def test_garbage_and_truncated_pickles(tmp_path, data):
    p = tmp_path / "x.pickle"
    p.write_bytes(data)
    with pytest.raises(pickle.UnpicklingError):
        restricted_load(p)


def test_custom_allow_list(tmp_path):
    p = tmp_path / "x.pickle"
    p.write_bytes(pickle.dumps(collections.Counter("aab")))
    with pytest.raises(pickle.UnpicklingError, match="collections.Counter"):
        restricted_load(p)
    allowed = frozenset({("collections", "Counter"), ("builtins", "dict")})
    assert restricted_load(p, allowed) == collections.Counter("aab")
    with open(p, "rb") as fh:
        assert RestrictedUnpickler(fh, allowed).load()["a"] == 2


# ------------------------------------------------------------------------------ atomic writes
def test_atomic_writes_replace_and_leave_no_temp_files(tmp_path):
    p = tmp_path / "sub" / "f.json"
    write_json_atomic(p, {"a": "é"})
    assert p.read_text(encoding="utf-8") == '{\n  "a": "é"\n}\n'
    write_text_atomic(p, "two")
    write_bytes_atomic(p, b"three")
    assert p.read_bytes() == b"three"
    pickle_atomic(tmp_path / "e.pickle", {0: "a"})
    assert restricted_load(tmp_path / "e.pickle") == {0: "a"}
    assert sorted(x.name for x in tmp_path.rglob("*")) == ["e.pickle", "f.json", "sub"]


def test_atomic_path_keeps_old_file_on_error(tmp_path):
    p = tmp_path / "model.pth"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["model.pth"]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_files_get_normal_permissions(tmp_path, umask, mode):
    """Regression: files came out 0600 (mkstemp), unreadable to the group that shares a models folder."""
    old = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "hierarchy.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "hierarchy.json").stat().st_mode) == mode


def test_kill_9_during_atomic_write_keeps_old_file(tmp_path):
    target = tmp_path / "model.pth"
    target.write_bytes(b"old complete file")
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO / 'src')!r})
        from hiernet.safeio import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(b"new but incomplete")
                fh.flush()
                print("writing", flush=True)
                time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert readline_within(proc).strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert target.read_bytes() == b"old complete file"
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".model.pth.tmp-")
    remove_stale(tmp_path, "model.pth")  # the next run clears it
    assert list(tmp_path.iterdir()) == [target]


def test_replace_dir_and_remove_stale(tmp_path):
    target, staging = tmp_path / "node", tmp_path / ".node.tmp-1"
    target.mkdir()
    (target / "model.pth").write_text("old")
    staging.mkdir()
    (staging / "model.pth").write_text("new")
    replace_dir(staging, target)
    assert (target / "model.pth").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["node"]
    for name in (".node.tmp-9", ".node.old-9", ".node.staging-9"):
        (tmp_path / name).mkdir()
    (tmp_path / ".node.tmp-file").write_text("x")
    (tmp_path / ".other.tmp-1").mkdir()
    remove_stale(tmp_path, "node")
    assert sorted(os.listdir(tmp_path)) == [".other.tmp-1", "node"]


def _folder(path: Path, version: str, n: int = 5) -> Path:
    path.mkdir()
    for i in range(n):
        (path / f"f{i}").write_text(version)
    return path


def _versions(path: Path) -> set[str]:
    return {f.read_text() for f in path.iterdir()} if len(os.listdir(path)) == 5 else {"incomplete"}


@pytest.mark.parametrize("atomic", [True, False], ids=["exchange", "fallback"])
def test_replace_dir_swaps_and_cleans_up(tmp_path, monkeypatch, atomic):
    import hiernet.safeio as safeio

    if not atomic:
        monkeypatch.setattr(safeio, "_exchange", lambda a, b: False)
    target = _folder(tmp_path / "node", "old")
    (tmp_path / ".node.old-4242").mkdir()  # left aside by a crashed earlier swap: stale once node exists
    replace_dir(_folder(tmp_path / ".node.tmp-1", "new"), target)
    assert _versions(target) == {"new"} and sorted(os.listdir(tmp_path)) == ["node"]
    replace_dir(_folder(tmp_path / ".node.tmp-2", "newer"), target)  # and again over the new one
    assert _versions(target) == {"newer"} and sorted(os.listdir(tmp_path)) == ["node"]


def test_replace_dir_puts_back_a_folder_a_killed_swap_left_aside(tmp_path):
    # killed between "target aside" and "staging in": only .node.old-<pid> holds the models
    _folder(tmp_path / ".node.old-77", "old")
    remove_stale(tmp_path, "node")
    assert _versions(tmp_path / "node") == {"old"} and sorted(os.listdir(tmp_path)) == ["node"]
    (tmp_path / "node").rename(tmp_path / ".node.old-78")
    replace_dir(_folder(tmp_path / ".node.tmp-1", "new"), tmp_path / "node")
    assert _versions(tmp_path / "node") == {"new"} and sorted(os.listdir(tmp_path)) == ["node"]


_SWAPPER = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
import hiernet.safeio as safeio
if sys.argv[3] == "fallback":
    safeio._exchange = lambda a, b: False
root = Path(sys.argv[1])
k = 0
while True:
    k += 1
    stage = root / f".node.tmp-{k}"
    stage.mkdir()
    for i in range(5):
        (stage / f"f{i}").write_text(str(k))
    safeio.replace_dir(stage, root / "node")
"""


@pytest.mark.parametrize("mode", ["exchange", "fallback"])
def test_replace_dir_survives_kill_9_at_any_moment(tmp_path, mode):
    import random
    import signal
    import subprocess
    import sys
    import time

    src = str(Path(__file__).resolve().parents[1] / "src")
    rng = random.Random(0)
    _folder(tmp_path / "node", "0")
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", _SWAPPER, str(tmp_path), src, mode])
        time.sleep(0.3 + rng.random() * 0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if mode == "exchange":  # the atomic swap: a complete folder at every moment, no repair needed
            assert len(_versions(tmp_path / "node")) == 1 and "incomplete" not in _versions(tmp_path / "node")
        remove_stale(tmp_path, "node")  # what the next run does first
        v = _versions(tmp_path / "node")
        assert len(v) == 1 and "incomplete" not in v, v
        assert sorted(os.listdir(tmp_path)) == ["node"]


# ------------------------------------------------------------------------------ locks
def test_lock_excludes_a_second_holder_and_is_released(tmp_path):
    lock = tmp_path / "models" / ".parent.lock"
    with exclusive_lock(lock, "training of node 'parent'"):
        with pytest.raises(LockHeld) as ei:
            with exclusive_lock(lock, "training of node 'parent'"):
                pass
        msg = str(ei.value)
        assert "training of node 'parent' is already running" in msg and str(lock) in msg and "\n" not in msg
        assert isinstance(ei.value, UserError)
    with exclusive_lock(lock, "again"):  # released at the end of the block
        assert lock.read_text() == str(os.getpid())
    assert not lock.exists() and os.listdir(lock.parent) == []  # no lock file left in the user's folder


def test_lock_taken_on_a_removed_lock_file_moves_to_the_current_one(tmp_path):
    """A waiter that opened the lock file before its holder removed it must not lock the orphan: two
    processes would then both hold 'the' lock (one on the orphan, one on the new file)."""
    import fcntl

    from hiernet.safeio import _flock_current

    lock = tmp_path / ".node.lock"
    lock.write_text("")
    stale = open(lock, "a+")  # opened before the holder finished ...
    lock.unlink()  # ... and removed the file
    lock.write_text("")  # a new holder's file
    fh = _flock_current(stale, lock)
    try:
        assert os.fstat(fh.fileno()).st_ino == os.stat(lock).st_ino
        other = open(lock, "a+")
        with pytest.raises(BlockingIOError):  # the current file is the one held
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.close()
    finally:
        fh.close()


def test_lock_on_a_filesystem_without_flock_runs_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with caplog.at_level("WARNING"):
        with exclusive_lock(tmp_path / ".parent.lock", "training of node 'parent'"):
            ran.append(1)
    assert ran == [1] and "HIERNET_NO_LOCK" in caplog.text and "without a lock" in caplog.text


def test_no_lock_env_skips_locking(tmp_path, monkeypatch):
    monkeypatch.setenv("HIERNET_NO_LOCK", "1")
    with exclusive_lock(tmp_path / ".parent.lock", "x"):
        with exclusive_lock(tmp_path / ".parent.lock", "x"):  # no LockHeld: no lock at all
            pass
    assert not (tmp_path / ".parent.lock").exists()


def test_lock_held_by_another_process_and_freed_when_it_is_killed(tmp_path):
    lock = tmp_path / ".x.lock"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO / 'src')!r})
        from pathlib import Path
        from hiernet.safeio import exclusive_lock
        with exclusive_lock(Path({str(lock)!r}), "x"):
            print("held", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert readline_within(proc).strip() == "held"
        with pytest.raises(LockHeld):
            with exclusive_lock(lock, "x"):
                pass
    finally:
        proc.kill()
        proc.wait(10)
    deadline = time.monotonic() + 5
    while True:  # kill -9 leaves no stale lock
        try:
            with exclusive_lock(lock, "x"):
                break
        except LockHeld:
            assert time.monotonic() < deadline
            time.sleep(0.05)


# ------------------------------------------------------------------------------ run_cli
def test_run_cli_user_error_is_one_line_exit_2(capsys):
    def main():
        raise UserError("dataset folder x does not exist; pass -p ROOT")

    with pytest.raises(SystemExit) as ei:
        run_cli(main)
    assert ei.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "error: dataset folder x does not exist; pass -p ROOT\n"


def test_run_cli_keyboard_interrupt(capsys):
    def main():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as ei:
        run_cli(main)
    assert ei.value.code == 130
    assert capsys.readouterr().err.startswith("interrupted:")


@pytest.mark.parametrize("rc,code", [(None, 0), (0, 0), (1, 1)])
def test_run_cli_return_codes(rc, code):
    with pytest.raises(SystemExit) as ei:
        run_cli(lambda: rc)
    assert ei.value.code == code


def test_text_with_undecodable_file_names_is_written_as_valid_utf8(tmp_path):
    """Regression: a non-UTF-8 image name in predict.py -o output raised UnicodeEncodeError."""
    import json

    name = os.fsdecode(b"caf\xe9.jpg")  # how Python sees a Latin-1 file name: 'caf\udce9.jpg'
    write_json_atomic(tmp_path / "p.json", [{"path": name}])
    raw = (tmp_path / "p.json").read_bytes()
    raw.decode("utf-8")  # valid UTF-8
    back = json.loads(raw)[0]["path"]
    assert back == name and os.fsencode(back) == b"caf\xe9.jpg"  # and it round-trips to the real file
    write_text_atomic(tmp_path / "p.csv", f"{name},x\n")
    assert (tmp_path / "p.csv").read_bytes() == b"caf\\udce9.jpg,x\n"


# ------------------------------------------------------------------------------------ open_output
def test_open_output_replaces_a_regular_file_only_when_complete(tmp_path):
    from hiernet.safeio import open_output

    out = tmp_path / "p.csv"
    out.write_text("old\n")
    with pytest.raises(RuntimeError):
        with open_output(out) as fh:
            fh.write("half")
            raise RuntimeError("killed")
    assert out.read_text() == "old\n" and not list(tmp_path.glob(".p.csv.tmp-*"))
    with open_output(out) as fh:
        fh.write("new\n")
    assert out.read_text() == "new\n"


def test_open_output_writes_through_a_symlink_to_the_file_it_names(tmp_path):
    from hiernet.safeio import open_output

    real, link = tmp_path / "real.csv", tmp_path / "link.csv"
    real.write_text("old\n")
    link.symlink_to(real)
    with open_output(link) as fh:
        fh.write("new\n")
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text() == "new\n"


def test_open_output_writes_into_a_device_without_replacing_it(tmp_path):
    from hiernet.safeio import open_output, output_kind

    dev = tmp_path / "null"
    try:
        os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a copy of /dev/null
    except PermissionError:
        pytest.skip("mknod needs root")
    assert output_kind(dev) == "stream"
    with open_output(dev) as fh:
        fh.write("x" * 100)
    assert stat.S_ISCHR(os.stat(dev).st_mode) and not list(tmp_path.glob(".null.tmp-*"))


def test_open_output_writes_into_a_fifo(tmp_path):
    import threading

    from hiernet.safeio import open_output

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo).read()), daemon=True)
    reader.start()
    with open_output(fifo) as fh:
        fh.write("through\n")
    reader.join(10)
    assert got == ["through\n"] and stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_open_output_dash_is_stdout_and_a_folder_is_refused(tmp_path, capsys):
    from hiernet.safeio import UserError, check_output_path, open_output

    with open_output("-") as fh:
        fh.write("to stdout\n")
    assert capsys.readouterr().out == "to stdout\n"
    with pytest.raises(UserError, match="is a folder"):
        check_output_path(tmp_path)
    with pytest.raises(UserError, match="is a folder"):
        with open_output(tmp_path):
            pass
