"""Helpers shared by the benchmark scripts: machine description, subprocess timing, report writing.

Nothing here imports torch or onnxruntime (versions are read from the installed package metadata),
so a benchmark's parent process stays small and does not inflate the peak memory of its children.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

#: The repository root (the folder holding ``src/`` and ``bench/``).
REPO = Path(__file__).resolve().parents[1]
#: Default dataset: the shared clothing photos beside the repository.
DEFAULT_DATASET = REPO.parent / "shared" / "datasets" / "clothing"
RESULTS_DIR = REPO / "bench" / "results"


class BenchError(Exception):
    """A problem the user can fix: printed as one line, exit code 2 (:func:`run_cli`)."""


def run_cli(main: Callable, get_args_parser: Callable) -> None:
    """A benchmark script's ``__main__``: ``main(get_args_parser().parse_args())``, its return value the exit
    code; a :class:`BenchError` or the suite's ``UserError`` is one ``error:`` line on stderr and exit code 2,
    Ctrl-C one ``interrupted`` line and exit code 130."""
    sys.path.insert(0, str(REPO / "src"))
    from hiernet.safeio import UserError

    try:
        sys.exit(main(get_args_parser().parse_args()))
    except (BenchError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ---------------------------------------------------------------------- machine description
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


#: CPU flags (``/proc/cpuinfo``) that decide how fast onnxruntime's int8 and fp32 kernels run, in the
#: order reported: the vector width and the int8 dot-product instructions (VNNI).
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimd", "asimddp", "i8mm")


def cpu_simd(cpuinfo: str | None = None) -> str:
    """The :data:`SIMD_FLAGS` this CPU has, space-separated (``"none found"`` if none; ``"unknown"`` without
    ``/proc/cpuinfo``). ``cpuinfo`` is the text of ``/proc/cpuinfo`` (read when ``None``)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "unknown"
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.lower().startswith(("flags", "features")) and ":" in line:
            flags.update(line.split(":", 1)[1].split())
    found = [f for f in SIMD_FLAGS if f in flags]
    return " ".join(found) if found else "none found"


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _gpus() -> str:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return "none found (no nvidia-smi)"
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "nvidia-smi failed"
    return "; ".join(line.split(" (UUID")[0] for line in out.splitlines()) or "none listed by nvidia-smi"


def usable_cores() -> int:
    """CPU cores this process may run on (``os.sched_getaffinity``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_info() -> dict:
    """What the numbers were measured on: CPU, usable cores, RAM, load, library versions, date."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    ort = _version("onnxruntime")
    if ort == "not installed":
        ort = _version("onnxruntime-gpu")
    return {
        "cpu_model": _cpu_model(),
        "cpu_simd": cpu_simd(),
        "usable_cores": usable_cores(),
        "logical_cpus": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "load_average_1_5_15": load,
        "gpu": _gpus(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "onnxruntime": ort,
        "date": _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "hostname": platform.node(),
    }


MACHINE_LABELS = (
    ("cpu_model", "CPU"),
    ("cpu_simd", "vector / int8 instructions (/proc/cpuinfo flags)"),
    ("usable_cores", "usable cores (sched_getaffinity)"),
    ("logical_cpus", "logical CPUs on the host"),
    ("ram_gib", "RAM (GiB)"),
    ("load_average_1_5_15", "load average at start (1/5/15 min)"),
    ("gpu", "GPU"),
    ("os", "OS"),
    ("python", "Python"),
    ("torch", "torch"),
    ("onnxruntime", "onnxruntime"),
    ("date", "date"),
)


def machine_markdown(info: dict) -> str:
    """The machine description as a two-column markdown table."""
    rows = []
    for key, label in MACHINE_LABELS:
        v = info.get(key)
        if isinstance(v, (list, tuple)):
            v = " / ".join(str(x) for x in v)
        rows.append((label, "n/a" if v is None else str(v)))
    return md_table(["machine", ""], rows)


def busy_note(info: dict) -> str | None:
    """A warning line when the 1-minute load average at start exceeded the usable cores, else None."""
    load, cores = info.get("load_average_1_5_15"), info.get("usable_cores") or 1
    if load and load[0] > cores:
        return (f"**Warning:** the machine was busy when this started (1-minute load {load[0]:g} on {cores} usable "
                "cores); the timings are unreliable, multi-threaded PyTorch especially. Rerun on an idle machine.")
    return None


def command_line() -> str:
    """The exact command that started this process, shell-quoted."""
    return shlex.join([sys.executable, *sys.argv])


# ---------------------------------------------------------------------- formatting
def fmt(v, digits: int = 3, pct: bool = False) -> str:
    """A number for a table (``n/a`` for ``None``/NaN; ``pct`` shows a fraction as a percentage)."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, float)):
        if v != v:  # NaN
            return "n/a"
        if pct:
            return f"{v * 100:.{max(0, digits - 2)}f} %"
        if isinstance(v, int):
            return str(v)
        return f"{v:.{digits}f}"
    return str(v)


def md_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub-markdown table; cells are formatted with :func:`fmt` and ``|`` is escaped."""
    def cell(x) -> str:
        return (x if isinstance(x, str) else fmt(x)).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(markdown: str, data: dict, out: Path) -> tuple[Path, Path]:
    """Write ``out`` (markdown) and its JSON twin ``out`` with suffix ``.json``; returns both paths."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    js = out.with_suffix(".json")
    if js == out:
        raise BenchError(f"--out {out} must not end in .json (the JSON twin is written beside it)")
    if str(REPO / "src") not in sys.path:
        sys.path.insert(0, str(REPO / "src"))
    from hiernet.safeio import open_output  # atomic for files, written through for devices, symlinks followed

    with open_output(out) as fh:
        fh.write(markdown if markdown.endswith("\n") else markdown + "\n")
    with open_output(js) as fh:
        fh.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    return out, js


# ---------------------------------------------------------------------- samples and timed passes
def every_kth(items: Sequence, n: int) -> list:
    """The first ``n`` of every k-th item (k = ``len(items) // n``, at least 1): ``n`` spread over the list,
    all of them when there are no more than ``n``."""
    return list(items)[::max(1, len(items) // max(1, n))][:n]


def sample_images(folder: Path, n: int, strict: bool = True, flag: str = "--images") -> tuple[list[Path], int]:
    """:func:`every_kth` of the images under ``folder`` (sorted), and how many there are.

    ``strict``: fewer than ``n`` images is refused (a benchmark that promises ``n``); otherwise all are taken.
    ``flag``: the option that names the folder, for the error line."""
    from hiernet.images import list_images

    if n < 1:
        raise BenchError("--n must be at least 1")
    if not folder.is_dir():
        raise BenchError(f"image folder {folder} not found; pass {flag} DIR")
    found = sorted(list_images(folder))
    if not found:
        raise BenchError(f"no images under {folder}; pass {flag} DIR with images in it")
    if strict and len(found) < n:
        raise BenchError(f"only {len(found)} images under {folder}, fewer than --n {n}; lower --n")
    return every_kth(found, n), len(found)


def interleaved_passes(fns: Sequence[Callable[[], object]], repeats: int) -> list[list[float]]:
    """Seconds of each of ``fns`` (called without arguments) in each of ``repeats`` passes, ``[fn][pass]``.

    The passes are interleaved, the order reversed every other pass, so that a drift of the machine's speed
    (another job, a model built or quantised just before) weighs on every function alike."""
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        for k in (range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))):
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return times


# ---------------------------------------------------------------------- subprocesses
#: A tqdm progress-bar line ("epoch 3/60:  40%|████      | 2/5 [...]"): left out of error tails.
_PROGRESS_RE = re.compile(r"\d+%\|.*\|")


@dataclass
class StageRun:
    """One finished child process: exit code, wall time and the peak RSS of its process tree."""

    cmd: list
    returncode: int
    wall_s: float
    max_rss_mib: float
    stdout_lines: list = field(default_factory=list)  # (seconds since start, line)
    stderr_path: Path | None = None

    def stderr_tail(self, n: int = 20) -> str:
        """The last ``n`` non-empty lines of stderr (progress-bar carriage returns split too)."""
        if self.stderr_path is None or not self.stderr_path.exists():
            return ""
        text = self.stderr_path.read_text(encoding="utf-8", errors="replace")
        lines = [ln.rstrip() for ln in text.replace("\r", "\n").splitlines()
                 if ln.strip() and not _PROGRESS_RE.search(ln)]
        return "\n".join(lines[-n:])


def run_timed(cmd: Sequence, log_dir: Path | None = None, name: str = "stage", env: dict | None = None,
              on_line: Callable[[float, str], None] | None = None) -> StageRun:
    """Run ``cmd`` and wait for it with ``os.wait4``, so the peak memory is this child's own.

    stdout is read line by line as it comes (each line time-stamped, passed to ``on_line`` and saved to
    ``log_dir/<name>.stdout.log``); stderr goes to ``log_dir/<name>.stderr.log`` (a temporary file when
    ``log_dir`` is None). ``max_rss_mib`` is ``ru_maxrss`` of the child, i.e. the largest resident set of
    the child and of any descendant it waited for (Linux reports KiB).
    """
    import tempfile

    cmd = [str(c) for c in cmd]
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        err_path = log_dir / f"{name}.stderr.log"
        out_log = open(log_dir / f"{name}.stdout.log", "w", encoding="utf-8")
    else:
        fd, tmp = tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".stderr.log")
        os.close(fd)
        err_path, out_log = Path(tmp), None
    lines = []
    with open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                text=True, encoding="utf-8", errors="replace", bufsize=1)
        try:
            for line in proc.stdout:
                t = time.perf_counter() - t0
                line = line.rstrip("\n")
                lines.append((t, line))
                if out_log:
                    out_log.write(line + "\n")
                    out_log.flush()
                if on_line:
                    on_line(t, line)
            proc.stdout.close()
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            if out_log:
                out_log.close()
        wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc  # reaped here, not by Popen.wait
    rss_kib = usage.ru_maxrss if sys.platform != "darwin" else usage.ru_maxrss / 1024
    return StageRun(cmd, rc, wall, rss_kib / 1024.0, lines, err_path)


def children_max_rss_mib() -> float:
    """``getrusage(RUSAGE_CHILDREN).ru_maxrss`` in MiB: the largest child reaped so far."""
    import resource

    v = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (v / 1024 / 1024) if sys.platform == "darwin" else v / 1024.0


def log(msg: str) -> None:
    """Progress for the person watching (stderr, so stdout stays the markdown report)."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)
