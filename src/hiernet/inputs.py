"""What to predict, read lazily: image files, folders, path lists (.txt) and catalogue CSVs.

Inputs are iterated, never listed whole: a folder is walked one directory at a time (sorted, hidden
entries skipped), a list or CSV is read line by line. Each input becomes an :class:`InputItem` (the
path as it will be printed, and the catalogue id if any), once: a path met again (given twice, or a
file inside a folder also given) is skipped. A missing file is kept (its record gets an ``error``),
so every input the user named has a row.

Relative paths in a ``.txt`` list or a catalogue CSV are resolved from the folder of that file (so a
list can travel with the photos), not from the current folder.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .images import is_image_name
from .safeio import UserError

log = logging.getLogger(__name__)

#: A list file: one path per line (blank lines and lines starting with ``#`` are skipped).
LIST_SUFFIXES = (".txt",)


@dataclass(frozen=True)
class InputItem:
    """One image to predict: ``path`` (as printed in the records) and the catalogue ``id`` (or ``None``)."""

    path: str
    id: str | None = None


@dataclass(frozen=True)
class CatalogueColumns:
    """Which columns of a catalogue CSV hold the image path and (optionally) the id."""

    image: str = "image"
    id: str | None = None


def walk_images(folder: str | os.PathLike) -> Iterator[str]:
    """Image files under ``folder`` (by extension, hidden ones skipped), in sorted order, lazily."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if is_image_name(f):
                yield os.path.join(dirpath, f)


def read_path_list(list_file: str | os.PathLike) -> Iterator[str]:
    """The paths of a ``.txt`` list, one per line; relative ones resolved from the list's folder."""
    base = os.path.dirname(os.path.abspath(list_file))
    with open(list_file, encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            line = line.strip()
            if line and not line.startswith("#"):
                yield line if os.path.isabs(line) else os.path.join(base, line)


def read_catalogue(csv_file: str | os.PathLike, columns: CatalogueColumns) -> Iterator[InputItem]:
    """The rows of a catalogue CSV as items: image path (relative: from the CSV's folder) and id.

    Raises
    ------
    UserError
        The file cannot be read, or lacks a named column (the message lists the columns it has).
    """
    path = Path(csv_file)
    base = os.path.dirname(os.path.abspath(path))
    try:
        fh = open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")
    except OSError as exc:
        raise UserError(f"cannot read --csv {path.resolve()}: {exc.strerror}") from None
    with fh:
        reader = csv.DictReader(fh)
        have = reader.fieldnames or []
        for flag, col in (("--image-column", columns.image), ("--id-column", columns.id)):
            if col is not None and col not in have:
                raise UserError(f"{flag} {col!r} is not a column of {path.resolve()}; it has: {', '.join(have) or 'none'}")
        for row in reader:
            img = (row.get(columns.image) or "").strip()
            if not img:
                continue
            yield InputItem(img if os.path.isabs(img) else os.path.join(base, img),
                            (row.get(columns.id) or "").strip() if columns.id else None)


def iter_inputs(paths: Iterable[str], catalogue: str | None = None, columns: CatalogueColumns | None = None,
                warn: Callable[[str, str], None] | None = None) -> Iterator[InputItem]:
    """Every input once, in the order given: files, folders (recursively), ``.txt`` lists, then the CSV rows.

    ``warn(input, problem)`` is called for an input that yields nothing (an empty folder). A path
    that does not exist is yielded all the same (its prediction carries the error).
    """
    warn = warn or (lambda raw, why: log.warning("%s: %s", raw, why))
    seen: set[str] = set()

    def once(item: InputItem) -> Iterator[InputItem]:
        key = os.path.normpath(os.path.abspath(item.path))
        if key not in seen:
            seen.add(key)
            yield item

    def expand(raw: str, from_list: bool = False) -> Iterator[InputItem]:
        if os.path.isdir(raw):
            n = 0
            for f in walk_images(raw):
                n += 1
                yield from once(InputItem(f))
            if not n:
                warn(raw, "folder holds no images")
        elif not from_list and raw.lower().endswith(LIST_SUFFIXES) and os.path.isfile(raw):
            for line in read_path_list(raw):
                yield from expand(line, from_list=True)
        else:
            yield from once(InputItem(raw))

    for raw in paths:
        yield from expand(str(raw))
    if catalogue is not None:
        for item in read_catalogue(catalogue, columns or CatalogueColumns()):
            yield from once(item)


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` → ``(K, N)`` with ``0 <= K < N``.

    Raises
    ------
    UserError
        Not of that form.
    """
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r}: expected K/N, e.g. 0/4 (shards are numbered 0 to N-1)") from None
    if n < 1 or not 0 <= k < n:
        raise UserError(f"--shard {text}: K must be between 0 and N-1 (shards are numbered 0 to {max(n, 1) - 1})")
    return k, n


def take_shard(items: Iterable, k: int, n: int) -> Iterator:
    """The items whose position ``i`` (0-based, in input order) has ``i % n == k``."""
    for i, item in enumerate(items):
        if i % n == k:
            yield item
