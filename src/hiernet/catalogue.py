"""Catalogue exports (CSV) as a labelled image set: rows → checked images, safe node ids, skipped rows.

A catalogue names, per row, an image (a path relative to the CSV, an absolute path or an http(s)
URL) and a category, either one column per level (``masterCategory,subCategory,articleType``) or one
column holding a path (``Apparel > Topwear > Tshirts``). Empty trailing levels make a *partial* label
that stops at an inner node. Bad rows are never fatal: each is returned with its CSV line number and
a reason. Category names become folder-safe node ids; the original names are kept for display.
"""

from __future__ import annotations

import csv
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .downloads import DownloadCache, is_url
from .hierarchy import unique_names
from .safeio import UserError, sha256_file

log = logging.getLogger(__name__)

SPLIT_VALUES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "test"}


@dataclass
class CatalogueSpec:
    """Which CSV columns hold what (see ``prepare_dataset.py --help``)."""

    csv: Path
    image_column: str
    label_columns: list[str]
    separator: str | None = None
    id_column: str | None = None
    split_column: str | None = None
    encoding: str = "utf-8-sig"


@dataclass
class Row:
    """One usable-looking CSV record: its first line number, image reference, label names, id, split."""

    line: int
    image: str
    labels: list[str]
    id: str | None = None
    split: str | None = None


@dataclass
class LabelledImages:
    """Images with labels, ready for the split and the datasets (from a tree or a catalogue).

    Attributes
    ----------
    groups : dict
        node id (a leaf, or an inner node for partial labels) → list of image keys.
    hashes : dict
        image key → SHA-256 of its bytes (hex).
    extra : dict
        image key → fields recorded with the image in hierarchy.json (``line``, ``id``, ``url``, ...).
    skipped : list of dict
        ``{"line" or "path": ..., "reason": ...}`` for every row or file left out.
    display : dict
        node id → original category name, for nodes whose name was changed to be folder-safe.
    splits : dict or None
        image key → given split (``--split-column``), else ``None``.
    """

    groups: dict[str, list[str]]
    hashes: dict[str, str]
    extra: dict[str, dict] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    display: dict[str, str] = field(default_factory=dict)
    splits: dict[str, str] | None = None


# ---------------------------------------------------------------------------------- reading the CSV
def read_rows(spec: CatalogueSpec) -> tuple[list[Row], list[dict]]:
    """Parse the CSV into rows; bad rows become ``{"line", "reason"}`` entries.

    Raises
    ------
    UserError
        The file is missing/unreadable, not decodable with ``spec.encoding``, not CSV, or lacks a
        named column (the message lists the columns it has).
    """
    try:
        fh = open(spec.csv, newline="", encoding=spec.encoding)
    except FileNotFoundError:
        raise UserError(f"catalogue {spec.csv} not found; pass --csv FILE") from None
    except LookupError:
        raise UserError(f"unknown --encoding {spec.encoding!r}; try utf-8 or latin-1") from None
    rows, skipped = [], []
    with fh:
        reader = csv.reader(fh, strict=True)
        try:
            header = _check_header(next(reader, None), spec)
            while True:
                start = reader.line_num + 1
                rec = next(reader, None)
                if rec is None:
                    break
                if not any(v.strip() for v in rec):
                    continue
                row = _parse_row(rec, header, spec, start)
                (skipped if isinstance(row, dict) else rows).append(row)
        except UnicodeDecodeError as exc:
            raise UserError(
                f"{spec.csv} line {_undecodable_line(spec.csv, spec.encoding)}: bytes that are not {spec.encoding} "
                f"({exc.reason}); pass the file's encoding with --encoding (e.g. --encoding latin-1)"
            ) from None
        except csv.Error as exc:
            raise UserError(f"{spec.csv} line {reader.line_num}: not valid CSV ({exc}); fix the file and rerun") from None
    return rows, skipped


def _undecodable_line(path: Path, encoding: str) -> int:
    """The number of the first line of ``path`` that does not decode (text is read in blocks)."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                raw.decode(encoding)
            except UnicodeDecodeError:
                return number
    return 1


def _check_header(header: list[str] | None, spec: CatalogueSpec) -> dict[str, int]:
    if not header:
        raise UserError(f"catalogue {spec.csv} is empty; it needs a header row naming its columns")
    cols: dict[str, int] = {}
    for i, name in enumerate(header):
        cols.setdefault(name.strip(), i)
    wanted = [spec.image_column, *spec.label_columns, spec.id_column, spec.split_column]
    missing = [c for c in wanted if c is not None and c not in cols]
    if missing:
        raise UserError(
            f"{spec.csv} has no column {', '.join(repr(c) for c in missing)}; "
            f"its columns are: {', '.join(c for c in cols if c)}"
        )
    return cols


def _parse_row(rec: list[str], cols: dict[str, int], spec: CatalogueSpec, line: int) -> Row | dict:
    def get(col: str) -> str:
        i = cols[col]
        return rec[i].strip() if i < len(rec) else ""

    image = get(spec.image_column)
    if not image:
        return {"line": line, "reason": f"empty image column '{spec.image_column}'"}
    labels, reason = parse_label([get(c) for c in spec.label_columns], spec.separator)
    if reason:
        return {"line": line, "reason": reason}
    split = None
    if spec.split_column:
        value = get(spec.split_column)
        split = SPLIT_VALUES.get(value.lower())
        if split is None:
            return {"line": line, "reason": f"split {value!r} in column '{spec.split_column}' is not train, val or test"}
    ident = get(spec.id_column) if spec.id_column else None
    if spec.id_column and not ident:
        return {"line": line, "reason": f"empty id column '{spec.id_column}'"}
    return Row(line, image, labels, ident, split)


def parse_label(values: list[str], separator: str | None) -> tuple[list[str], str | None]:
    """Category names from the label column(s): ``(names, None)`` or ``([], reason)``.

    With ``separator`` the single value is split on it. Trailing empty levels are dropped (a partial
    label); an empty level followed by a filled one, or no level at all, is an error.
    """
    if separator is not None:
        values = [v.strip() for v in values[0].split(separator)] if values[0] else []
    while values and not values[-1]:
        values = values[:-1]
    if not values:
        return [], "empty label"
    if not all(values):
        return [], f"empty category level {values.index('') + 1} before a filled one in {' > '.join(values)!r}"
    return values, None


# ---------------------------------------------------------------------------------- rows → images
def node_ids(labels: list[tuple[str, ...]]) -> tuple[dict[tuple[str, ...], str], dict[str, str]]:
    """Folder-safe, path-unique node ids for label paths (of original names).

    Returns
    -------
    (dict, dict)
        label path (every prefix too) → node id (``"Apparel/Topwear"``), and node id → original
        name for the nodes whose safe name differs from it.
    """
    children: dict[tuple[str, ...], set[str]] = {}
    for path in labels:
        for k in range(len(path)):
            children.setdefault(path[:k], set()).add(path[k])
    ids: dict[tuple[str, ...], str] = {(): ""}
    display = {}
    for parent in sorted(children, key=len):
        safe = unique_names(children[parent])
        for name in children[parent]:
            nid = f"{ids[parent]}/{safe[name]}" if parent else safe[name]
            ids[parent + (name,)] = nid
            if safe[name] != name:
                display[nid] = name
    del ids[()]
    return ids, display


def _resolve(row: Row, base: Path, downloaded: dict[str, Path | str]) -> Path | str:
    """The local file of a row's image, or a reason why there is none."""
    if is_url(row.image):
        return downloaded[row.image]
    p = Path(row.image)
    p = p if p.is_absolute() else base / p
    if not p.exists():
        return f"image {row.image} not found"
    return p.resolve()


def _check_and_hash(path: Path) -> str | tuple[str]:
    """SHA-256 of a decodable image, or ``(reason,)``."""
    from .images import check_image

    reason = check_image(path)
    if reason:
        return (f"unreadable image: {reason}",)
    return sha256_file(path)


def load_catalogue(spec: CatalogueSpec, cache: DownloadCache | None = None, workers: int = 8,
                   progress: bool = True) -> LabelledImages:
    """Read, download, check and hash a catalogue's images; see :class:`LabelledImages`.

    Bad rows (unreadable or missing image, failed download, empty label, duplicate id, the same
    image given twice, or with two different labels) are listed in ``skipped`` and left out.
    """
    from tqdm import tqdm

    rows, skipped = read_rows(spec)
    rows = _drop_duplicate_ids(rows, skipped)
    urls = [r.image for r in rows if is_url(r.image)]
    downloaded = {}
    if urls:
        if cache is None:
            raise UserError("the catalogue holds http(s) URLs but no download folder was given")
        downloaded = cache.fetch_all(urls, workers=workers, progress=progress)
    base = spec.csv.resolve().parent
    files = {id(r): _resolve(r, base, downloaded) for r in rows}
    todo = sorted({p for p in files.values() if isinstance(p, Path)})
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        checked = dict(zip(todo, tqdm(pool.map(_check_and_hash, todo), total=len(todo), desc="checking images",
                                      unit="img", disable=not progress)))
    kept: list[tuple[Row, Path, str]] = []
    for r in rows:
        f = files[id(r)]
        result = checked.get(f) if isinstance(f, Path) else (f,)
        if isinstance(result, tuple):
            skipped.append({"line": r.line, "reason": result[0]})
        else:
            kept.append((r, f, result))
    kept = _drop_conflicts(kept, skipped)
    return _assemble(kept, skipped, spec)


def _drop_duplicate_ids(rows: list[Row], skipped: list[dict]) -> list[Row]:
    first: dict[str, int] = {}
    out = []
    for r in rows:
        if r.id is not None and r.id in first:
            skipped.append({"line": r.line, "reason": f"duplicate id {r.id!r} (first on line {first[r.id]})"})
            continue
        if r.id is not None:
            first[r.id] = r.line
        out.append(r)
    return out


def _drop_conflicts(kept: list[tuple[Row, Path, str]], skipped: list[dict]) -> list[tuple[Row, Path, str]]:
    """One row per image (same bytes = same image): repeats are dropped; different labels drop them all."""
    by_hash: dict[str, list[tuple[Row, Path, str]]] = {}
    for item in kept:
        by_hash.setdefault(item[2], []).append(item)
    out = []
    for items in by_hash.values():
        labels = {tuple(r.labels) for r, _, _ in items}
        if len(labels) > 1:
            lines = ", ".join(str(r.line) for r, _, _ in items)
            for r, _, _ in items:
                skipped.append({"line": r.line, "reason": f"the same image has different labels on lines {lines} "
                                                          f"(here {' > '.join(r.labels)!r}); fix the catalogue"})
            continue
        out.append(items[0])
        for r, _, _ in items[1:]:
            skipped.append({"line": r.line, "reason": f"the same image as line {items[0][0].line} (duplicate row)"})
    return out


def _assemble(kept: list[tuple[Row, Path, str]], skipped: list[dict], spec: CatalogueSpec) -> LabelledImages:
    ids, display = node_ids([tuple(r.labels) for r, _, _ in kept])
    out = LabelledImages(groups={}, hashes={}, skipped=sorted(skipped, key=lambda s: s["line"]), display=display,
                         splits={} if spec.split_column else None)
    for r, path, digest in sorted(kept, key=lambda k: k[0].line):
        key = str(path)
        out.groups.setdefault(ids[tuple(r.labels)], []).append(key)
        out.hashes[key] = digest
        extra = {"line": r.line, "label": list(r.labels)}
        if r.id is not None:
            extra["id"] = r.id
        if is_url(r.image):
            extra["url"] = r.image
        out.extra[key] = extra
        if out.splits is not None:
            out.splits[key] = r.split
    return out
