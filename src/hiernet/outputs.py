"""Output writers: one table of formats, each printing the same record per image.

A record is the dict :meth:`hiernet.predictor.Prediction.record` builds (floats unrounded):
``path``, ``labels`` (top level first), ``probs``, ``confidence``, ``node`` (deepest node id),
``complete``, ``topk`` (per level, ``[{"label", "prob"}, ...]``; absent when no level was predicted)
and ``error`` (only for unreadable images). Every writer prints every field of :data:`FIELDS`:

- ``json``: one array of objects, floats rounded to 6 digits;
- ``jsonl``: the same objects, one per line;
- ``csv``: one row per record, columns :data:`FIELDS`; lists are flattened: ``labels`` joined by
  ``/``, ``probs`` by ``;``, ``topk`` as ``label:prob`` joined by ``;`` within a level and `` | ``
  between levels; floats with 6 decimals, ``complete`` as 1/0, a missing field as an empty cell;
- ``text``: the original research script's layout (encoder, prediction per level, path); each
  encoder is printed once, before the first image that needs it, and several images end with a
  summary (counts per predicted top-level class, walks stopped early, unreadable images).

Records may carry an ``id`` (a catalogue's own identifier): json/jsonl print it as a field, csv as a
first column when ``OutputContext.with_id`` is set. Records of models whose tree has display names (a
catalogue's original category names) carry ``display``, ``labels`` in those names: json/jsonl print it
as a field, csv as a last column joined by `` > `` (names may hold ``/``) when
``OutputContext.with_display`` is set, text as a ``Display:`` line after ``Path:``. A walk stopped by ``--min-confidence`` has
``complete`` false, ``node`` the node where it stopped (``root`` above the top level) and, as the
last ``topk`` level, the candidates of the level it could not decide.

A writer is used as ``w = open_writer(fmt, stream, context)``, ``w.write(record)`` per image (it
writes at once), ``w.close()`` (writes the end; does not close ``stream``).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from typing import TextIO

#: Every record field, in output order.
FIELDS = ("path", "labels", "probs", "confidence", "node", "complete", "topk", "error")
DIGITS = 6
#: How csv and text join a record's ``display`` names (display names may contain ``/``).
DISPLAY_SEPARATOR = " > "


@dataclass
class OutputContext:
    """What a format may need beyond the records: ``encoders`` (classifier node id → {index: class
    name}) and the ``min_confidence`` the walk used (the text format prints both)."""

    encoders: dict = field(default_factory=dict)
    min_confidence: float = 0.0
    with_id: bool = False
    header: bool = True  # csv: write the header row (False when appending to a file that has one)
    with_display: bool = False

    @property
    def fields(self) -> tuple:
        """The csv columns: :data:`FIELDS`, after ``id`` when records carry one, before ``display`` when
        the models' tree has display names."""
        return ("id",) * self.with_id + FIELDS + ("display",) * self.with_display


def rounded(record: dict, digits: int = DIGITS) -> dict:
    """``record`` with its probabilities and confidence rounded (what json and jsonl print)."""
    out = dict(record)
    out["probs"] = [round(p, digits) for p in record["probs"]]
    out["confidence"] = round(record["confidence"], digits)
    if "topk" in record:
        out["topk"] = [[{"label": t["label"], "prob": round(t["prob"], digits)} for t in level] for level in record["topk"]]
    return out


class Writer:
    """Base of the writers: ``write`` one record at a time, then ``close``."""

    def __init__(self, stream: TextIO, context: OutputContext | None = None):
        self.stream = stream
        self.context = context or OutputContext()
        self.count = 0
        self.begin()

    def begin(self) -> None:
        """Write what comes before the first record."""

    def write(self, record: dict) -> None:
        self.write_one(record)
        self.count += 1

    def write_one(self, record: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Write what comes after the last record."""


class JsonWriter(Writer):
    """An indented JSON array, exactly as ``json.dumps(records, indent=2) + "\\n"`` prints it."""

    def write_one(self, record: dict) -> None:
        text = json.dumps(rounded(record), indent=2, ensure_ascii=False)
        self.stream.write(("[\n" if self.count == 0 else ",\n") + "\n".join("  " + ln for ln in text.split("\n")))

    def close(self) -> None:
        self.stream.write("[]\n" if self.count == 0 else "\n]\n")


class JsonlWriter(Writer):
    """One JSON object per line."""

    def write_one(self, record: dict) -> None:
        self.stream.write(json.dumps(rounded(record), ensure_ascii=False) + "\n")


def _f(x: float) -> str:
    return f"{x:.{DIGITS}f}"


def csv_row(record: dict, fields: tuple = FIELDS) -> list[str]:
    """``record`` flattened into ``fields`` cells (:data:`FIELDS` by default; see the module docstring)."""
    cells = {
        "id": str(record.get("id", "")),
        "path": record["path"],
        "labels": "/".join(record["labels"]),
        "probs": ";".join(_f(p) for p in record["probs"]),
        "confidence": _f(record["confidence"]),
        "node": record["node"],
        "complete": str(int(record["complete"])),
        "topk": " | ".join(";".join(f"{t['label']}:{_f(t['prob'])}" for t in level) for level in record.get("topk", [])),
        "error": record.get("error") or "",
        "display": DISPLAY_SEPARATOR.join(record.get("display", [])),
    }
    return [cells[k] for k in fields]


class CsvWriter(Writer):
    """A header row, then one row per record."""

    def begin(self) -> None:
        self.csv = csv.writer(self.stream)
        if self.context.header:
            self.csv.writerow(self.context.fields)

    def write_one(self, record: dict) -> None:
        self.csv.writerow(csv_row(record, self.context.fields))


LEVEL_NAMES = {1: "Parent class prediction"}


def level_title(level: int, n_levels: int, complete: bool = True) -> str:
    """The text format's title of a level (1 = top); the deepest level of a complete walk is final."""
    if level == n_levels and complete:
        return "Final Prediction"
    return LEVEL_NAMES.get(level, f"Level {level} prediction")


def text_lines(record: dict, context: OutputContext, seen: set | None = None) -> list[str]:
    """The text format's lines for one record (encoders already in ``seen`` are not printed again;
    the ones printed are added to it)."""
    lines = [f"== {record['path']}" + (f"  (id {record['id']})" if record.get("id") not in (None, "") else "")]
    if record.get("error"):
        return lines + [f"error: cannot read image: {record['error']}"]
    labels, probs, topk = record["labels"], record["probs"], record.get("topk", [])
    ids = record["node"].split("/") if labels else []  # node ids are paths: the level-L parent is ids[:L-1]
    for level, (label, prob) in enumerate(zip(labels, probs), start=1):
        parent = "/".join(ids[:level - 1])
        if parent in context.encoders and (seen is None or parent not in seen):
            lines.append(f"Encoder: {context.encoders[parent]}")
            if seen is not None:
                seen.add(parent)
        lines.append(f"{level_title(level, len(labels), record['complete'])}:  {label}  (p={prob:.4f})")
        if len(topk[level - 1]) > 1:
            lines.append("  top-k: " + ", ".join(f"{t['label']} {t['prob']:.4f}" for t in topk[level - 1]))
    if not record["complete"]:
        lines.append(f"Stopped at:  {labels[-1] if labels else 'root'}  "
                     f"(the next level would fall below --min-confidence {context.min_confidence})")
        if len(topk) > len(labels):
            lines.append("  candidates: " + ", ".join(f"{t['label']} {t['prob']:.4f}" for t in topk[len(labels)]))
    lines.append(f"Path: {' > '.join(labels) if labels else 'root'}  (confidence {record['confidence']:.4f})")
    if record.get("display"):
        lines.append(f"Display: {DISPLAY_SEPARATOR.join(record['display'])}")
    return lines


def summary_lines(n: int, top: dict, stopped: int, unreadable: int) -> list[str]:
    """The text format's closing summary: ``top`` is top-level label → count."""
    ranked = sorted(top.items(), key=lambda kv: (-kv[1], kv[0]))
    return [f"== summary: {n} images",
            "top level: " + (", ".join(f"{k} {v}" for k, v in ranked) or "-"),
            f"stopped early: {stopped}, unreadable: {unreadable}"]


class TextWriter(Writer):
    """The original script's layout, per image (see the README); encoders once; a summary at the end."""

    def begin(self) -> None:
        self.seen: set = set()
        self.top: dict = {}
        self.stopped = self.unreadable = 0

    def write_one(self, record: dict) -> None:
        self.stream.write("\n".join(text_lines(record, self.context, self.seen)) + "\n")
        if record.get("error"):
            self.unreadable += 1
            return
        if record["labels"]:
            self.top[record["labels"][0]] = self.top.get(record["labels"][0], 0) + 1
        self.stopped += not record["complete"]

    def close(self) -> None:
        if self.count == 0:
            self.stream.write("\n")
        elif self.count > 1:
            self.stream.write("\n".join(summary_lines(self.count, self.top, self.stopped, self.unreadable)) + "\n")


#: Format name → writer class.
WRITERS: dict[str, type[Writer]] = {"text": TextWriter, "json": JsonWriter, "jsonl": JsonlWriter, "csv": CsvWriter}


def open_writer(fmt: str, stream: TextIO, context: OutputContext | None = None) -> Writer:
    """A :data:`WRITERS` writer for ``fmt`` on ``stream``."""
    try:
        cls = WRITERS[fmt]
    except KeyError:
        raise ValueError(f"unknown output format {fmt!r}; use one of {', '.join(WRITERS)}") from None
    return cls(stream, context)


def render(fmt: str, records, context: OutputContext | None = None) -> str:
    """All ``records`` in format ``fmt``, as one string."""
    import io

    buf = io.StringIO()
    w = open_writer(fmt, buf, context)
    for r in records:
        w.write(r)
    w.close()
    return buf.getvalue()
