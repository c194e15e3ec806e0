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
- ``text``: the original research script's layout (encoder, prediction per level, path).

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


@dataclass
class OutputContext:
    """What a format may need beyond the records: ``encoders`` (classifier node id → {index: class
    name}) and the ``min_confidence`` the walk used (the text format prints both)."""

    encoders: dict = field(default_factory=dict)
    min_confidence: float = 0.0


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


def csv_row(record: dict) -> list[str]:
    """``record`` flattened into :data:`FIELDS` cells (see the module docstring)."""
    cells = {
        "path": record["path"],
        "labels": "/".join(record["labels"]),
        "probs": ";".join(_f(p) for p in record["probs"]),
        "confidence": _f(record["confidence"]),
        "node": record["node"],
        "complete": str(int(record["complete"])),
        "topk": " | ".join(";".join(f"{t['label']}:{_f(t['prob'])}" for t in level) for level in record.get("topk", [])),
        "error": record.get("error") or "",
    }
    return [cells[k] for k in FIELDS]


class CsvWriter(Writer):
    """A header row, then one row per record."""

    def begin(self) -> None:
        self.csv = csv.writer(self.stream)
        self.csv.writerow(FIELDS)

    def write_one(self, record: dict) -> None:
        self.csv.writerow(csv_row(record))


LEVEL_NAMES = {1: "Parent class prediction"}


def level_title(level: int, n_levels: int, complete: bool = True) -> str:
    """The text format's title of a level (1 = top); the deepest level of a complete walk is final."""
    if level == n_levels and complete:
        return "Final Prediction"
    return LEVEL_NAMES.get(level, f"Level {level} prediction")


def text_lines(record: dict, context: OutputContext) -> list[str]:
    """The text format's lines for one record."""
    lines = [f"== {record['path']}"]
    if record.get("error"):
        return lines + [f"error: cannot read image: {record['error']}"]
    labels, probs, topk = record["labels"], record["probs"], record.get("topk", [])
    ids = record["node"].split("/") if labels else []  # node ids are paths: the level-L parent is ids[:L-1]
    for level, (label, prob) in enumerate(zip(labels, probs), start=1):
        parent = "/".join(ids[:level - 1])
        if parent in context.encoders:
            lines.append(f"Encoder: {context.encoders[parent]}")
        lines.append(f"{level_title(level, len(labels), record['complete'])}:  {label}  (p={prob:.4f})")
        if len(topk[level - 1]) > 1:
            lines.append("  top-k: " + ", ".join(f"{t['label']} {t['prob']:.4f}" for t in topk[level - 1]))
    if not record["complete"]:
        lines.append(f"Final Prediction:  {labels[-1] if labels else '(none)'}  "
                     f"(stopped: the next level would fall below --min-confidence {context.min_confidence})")
    lines.append(f"Path: {' > '.join(labels)}  (confidence {record['confidence']:.4f})")
    return lines


class TextWriter(Writer):
    """The original script's layout, per image (see the README)."""

    def write_one(self, record: dict) -> None:
        self.stream.write("\n".join(text_lines(record, self.context)) + "\n")

    def close(self) -> None:
        if self.count == 0:
            self.stream.write("\n")


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
