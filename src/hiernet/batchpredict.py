"""Batch prediction at catalogue scale: stream records in input order, resume, split across ranks.

:func:`stream_records` pairs :class:`hiernet.inputs.InputItem` s with the predictor's predictions
(read lazily, in order) and yields one record per input. :func:`write_stream` writes them with a
writer of :mod:`hiernet.outputs`, flushing (and, for a resumable file, ``fsync``-ing) after every
batch. :func:`resume_state` reads what an earlier, possibly killed, run left in the output file.
Under torchrun, :func:`gather_in_order` interleaves the ranks' batches back into input order.
"""

from __future__ import annotations

import collections
import csv
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .inputs import InputItem
from .safeio import UserError

#: Formats that can be appended to and resumed (one record per line).
RESUMABLE = ("jsonl", "csv")
#: Output file name suffix → format, for ``-o`` without ``--format``.
SUFFIX_FORMATS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".txt": "text"}


def infer_format(fmt: str | None, output: str | os.PathLike | None) -> str:
    """``fmt`` if given, else the format ``output``'s suffix names, else ``text``."""
    if fmt:
        return fmt
    if output is not None and str(output) != "-":
        return SUFFIX_FORMATS.get(Path(output).suffix.lower(), "text")
    return "text"


@dataclass
class ResumeState:
    """What an output file already holds: the ``done`` input paths, and whether it has a csv header."""

    done: set = field(default_factory=set)
    has_header: bool = False
    truncated: int = 0  # bytes of a torn last line removed


def _truncate_torn_line(path: Path) -> int:
    """Cut a last line that has no newline (a write killed half-way); returns the bytes removed."""
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as fh:
        fh.seek(max(0, size - (1 << 16)))
        tail = fh.read()
        if tail.endswith(b"\n"):
            return 0
        cut = tail.rfind(b"\n")
        keep = size - len(tail) + cut + 1 if cut >= 0 else (0 if size <= (1 << 16) else None)
        if keep is None:  # a torn line longer than 64 KiB: find its start the slow way
            fh.seek(0)
            keep = fh.read().rfind(b"\n") + 1
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
        return size - keep


def resume_state(path: str | os.PathLike, fmt: str, fields: tuple) -> ResumeState:
    """Repair and read an output file to resume: a torn last line is cut; the paths it holds are done.

    Raises
    ------
    UserError
        ``fmt`` cannot be resumed, or the file is not an output of this format (other csv columns,
        a line that is not a JSON object).
    """
    if fmt not in RESUMABLE:
        raise UserError(f"--resume needs --format jsonl or csv (a {fmt} file cannot be appended to); "
                        "use -o FILE.jsonl or -o FILE.csv")
    path = Path(os.path.realpath(path))
    state = ResumeState()
    if not path.is_file():
        return state
    state.truncated = _truncate_torn_line(path)
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        if fmt == "jsonl":
            for n, line in enumerate(fh, 1):
                try:
                    state.done.add(json.loads(line)["path"])
                except (ValueError, KeyError, TypeError):
                    raise UserError(f"{path} line {n} is not a prediction record; cannot --resume into it") from None
            return state
        rows = csv.reader(fh)
        header = next(rows, None)
        if header is None:
            return state
        if tuple(header) != tuple(fields):
            raise UserError(f"{path} has the columns {','.join(header)}, not {','.join(fields)}; "
                            "cannot --resume into it (same --csv/--id-column as the first run?)")
        state.has_header = True
        state.done.update(r[fields.index("path")] for r in rows if r)
    return state


def stream_records(items: Iterable[InputItem], predict: Callable[[Iterable[str]], Iterator]) -> Iterator[dict]:
    """One record per item, in order: ``predict`` maps paths (read lazily) to predictions in order.

    The record is :meth:`Prediction.record`, with ``id`` first when the item has one.
    """
    pending: collections.deque = collections.deque()

    def paths():
        for item in items:
            pending.append(item)
            yield item.path

    for pred in predict(paths()):
        item = pending.popleft()
        rec = pred.record()
        yield {"id": item.id, **rec} if item.id is not None else rec


def sync(stream, durable: bool) -> None:
    """Flush ``stream``; with ``durable`` also ``fsync`` it (a kill -9 after this loses nothing written)."""
    stream.flush()
    if durable:
        try:
            os.fsync(stream.fileno())
        except (OSError, ValueError, AttributeError):  # a pipe or terminal cannot be synced
            pass


def batched(it: Iterable, n: int) -> Iterator[list]:
    """Lists of ``n`` consecutive items of ``it`` (the last one shorter)."""
    it = iter(it)
    return iter(lambda: list(itertools.islice(it, n)), [])


def write_stream(writer, batches: Iterable[list], durable: bool = False, bar=None) -> int:
    """Write each batch of records, then flush (and fsync when ``durable``); returns the count."""
    n = 0
    for batch in batches:
        for rec in batch:
            writer.write(rec)
        sync(writer.stream, durable)
        n += len(batch)
        if bar is not None:
            bar.update(len(batch))
    return n


def take_rank(items: Iterable, rank: int, world: int) -> Iterator:
    """This rank's share under torchrun: the items at positions ``i % world == rank``."""
    return itertools.islice(items, rank, None, world)


def gather_in_order(local: Iterable[dict], batch_size: int, rank: int, world: int,
                    all_gather: Callable[[object], list]) -> Iterator[list]:
    """Merge the ranks' records into input order (input ``i`` is on rank ``i % world``).

    Every rank calls this; each round, every rank contributes its next ``batch_size`` records (with
    ``all_gather``: object → list of every rank's object) and gets back the round's records of all
    ranks, interleaved: round ``t`` holds inputs ``t*batch_size*world`` to ``(t+1)*batch_size*world - 1``.
    Rounds continue until every rank is out of records.
    """
    mine = batched(local, batch_size)
    while True:
        chunk = next(mine, None)
        parts = all_gather((rank, chunk))
        chunks = [c for _, c in sorted(parts, key=lambda rc: rc[0])]
        if all(c is None for c in chunks):
            return
        chunks = [c or [] for c in chunks]
        merged = [c[m] for m in range(batch_size) for c in chunks if m < len(c)]
        yield merged
