"""Labelled texts from CSV / TSV files or folders of ``.txt`` files, with one clear error per kind of bad input.

A table's columns are found by name or 0-based index; left to ``None``, the text column is the one named like
text (``text``, ``sentence``, ``sms``, ...) or, without a header, the one with the longest cells, and the label
column the one named like a label or the other of two. ``header=None`` detects a header by those names. So
SST-2's ``sentence<TAB>label``, AG News' headerless ``text<TAB>label`` and SMS spam's ``Label<TAB>SMS`` all load
with no options.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from transfer_lit.backbones.weights import suggest

Column = str | int | None
BadTexts = Literal["error", "skip"]
TEXT_NAMES = ("text", "sentence", "sms", "content", "review", "document", "body", "message", "title")
LABEL_NAMES = ("label", "labels", "class", "target", "category", "sentiment", "y")


@dataclass(frozen=True)
class TableFormat:
    """How a table of texts is read (the ``TextDataModule`` arguments of the same names)."""

    text_column: Column = None
    label_column: Column = None
    header: bool | None = None
    delimiter: str = "auto"
    encoding: str = "utf-8"


def _decode(path: Path, key: str, encoding: str) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding)
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(f"{key}={str(path)!r}: line {line} is not valid {encoding} (byte "
                         f"{data[error.start:error.start + 1]!r} at offset {error.start}); re-save the file as UTF-8, "
                         f"or set data.encoding to its encoding (e.g. latin-1, cp1252)") from None
    except LookupError:
        raise ValueError(f"data.encoding={encoding!r} is not an encoding Python knows (e.g. utf-8, latin-1)") from None


def _delimiter(path: Path, text: str, delimiter: str) -> str:
    if delimiter != "auto":
        return {"tab": "\t", "\\t": "\t", "comma": ","}.get(delimiter, delimiter)
    if path.suffix.lower() in (".tsv", ".tab"):
        return "\t"
    if path.suffix.lower() == ".csv":
        return ","
    return "\t" if "\t" in text.split("\n", 1)[0] else ","


def _named(cells: list[str], names: tuple[str, ...]) -> int | None:
    lowered = [c.strip().lower() for c in cells]
    return next((lowered.index(n) for n in names if n in lowered), None)


def _column(value: Column, header: list[str] | None, width: int, key: str, path: Path) -> int:
    if isinstance(value, int):
        if not 0 <= value < width:
            raise ValueError(f"data.{key}={value} but {str(path)!r} has {width} column(s) (0-based indices "
                             f"0..{width - 1})")
        return value
    assert value is not None
    if header is None:
        raise ValueError(f"data.{key}={value!r} names a column but {str(path)!r} has no header row; give a 0-based "
                         f"column index instead, or set data.header=true")
    lowered = [c.strip().lower() for c in header]
    if value.lower() not in lowered:
        raise ValueError(f"data.{key}={value!r}: {str(path)!r} has no such column; its columns are {header}."
                         f"{suggest(value.lower(), lowered)}")
    return lowered.index(value.lower())


def read_table(path: Path, key: str, fmt: TableFormat, labelled: bool = True) -> list[tuple[str, str, int]]:
    """``[(text, label, line number)]`` of a CSV / TSV file (label ``""`` when ``labelled`` is False and the file
    has no label column). Texts are not checked here (see :func:`check_texts`)."""
    if not path.is_file():
        raise FileNotFoundError(f"{key}={str(path)!r}: no such file" if not path.is_dir() else
                                f"{key}={str(path)!r} is a folder; it takes a CSV / TSV file (a folder of class "
                                f"folders of .txt files goes to data.root)")
    content = _decode(path, key, fmt.encoding)
    delimiter = _delimiter(path, content, fmt.delimiter)
    reader = (csv.reader(io.StringIO(content, newline=""), delimiter=delimiter, quoting=csv.QUOTE_NONE)
              if delimiter == "\t" else csv.reader(io.StringIO(content, newline=""), delimiter=delimiter))
    rows = [r for r in reader if r]  # TSV texts keep their quote marks
    if not rows:
        raise ValueError(f"{key}={str(path)!r} is empty")
    first = rows[0]
    header = fmt.header
    if header is None:
        named = any(isinstance(c, str) for c in (fmt.text_column, fmt.label_column))  # names need a header row
        header = named or _named(first, TEXT_NAMES) is not None or _named(first, LABEL_NAMES) is not None
    head = first if header else None
    body = rows[1:] if header else rows
    start = 2 if header else 1
    if not body:
        raise ValueError(f"{key}={str(path)!r} has a header but no rows")
    width = len(first)
    text_col = _text_column(fmt.text_column, head, body, width, path)
    label_col = _label_column(fmt.label_column, head, width, text_col, path, labelled)
    out = []
    for number, row in enumerate(body, start):
        needed = max(text_col, label_col if label_col is not None else -1)
        if len(row) <= needed:
            raise ValueError(f"{key}={str(path)!r} line {number} has {len(row)} column(s), not {width}: {row[:3]}"
                             + ("; a tab-separated file needs the .tsv extension or data.delimiter='\\t'"
                                if delimiter == "," else ""))
        out.append((row[text_col], row[label_col].strip() if label_col is not None else "", number))
    return out


def _text_column(value: Column, header: list[str] | None, body: list[list[str]], width: int, path: Path) -> int:
    if value is not None:
        return _column(value, header, width, "text_column", path)
    if header is not None and (found := _named(header, TEXT_NAMES)) is not None:
        return found
    if width == 1:
        return 0
    sample = body[:1000]
    lengths = [sum(len(r[c]) for r in sample if len(r) > c) for c in range(width)]
    return max(range(width), key=lengths.__getitem__)


def _label_column(value: Column, header: list[str] | None, width: int, text_col: int, path: Path,
                  labelled: bool) -> int | None:
    if value is not None:
        return _column(value, header, width, "label_column", path)
    if header is not None and (found := _named(header, LABEL_NAMES)) is not None:
        return found
    if width == 2:
        return 1 - text_col
    if not labelled:
        return None
    raise ValueError(f"{str(path)!r} has {width} columns {header or ''}; say which holds the label with "
                     f"data.label_column (a name or 0-based index)")


def read_text_folders(folder: Path, key: str, encoding: str) -> dict[str, list[tuple[str, str]]]:
    """``{class: [(text, file)]}`` of ``folder/<class>/*.txt`` (hidden files and folders left out)."""
    classes = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith((".", "__MACOSX")))
    found = {}
    for class_dir in classes:
        files = sorted(f for f in class_dir.rglob("*.txt")
                       if not any(p.startswith(".") for p in f.relative_to(class_dir).parts))
        if files:
            found[class_dir.name] = [(_decode(f, key, encoding), str(f)) for f in files]
    if not found:
        raise ValueError(f"{key}={str(folder)!r} has no class folders of .txt files (expected "
                         f"{folder}/<class>/*.txt, or train/ and val/ folders of those)")
    return found


def check_texts(rows: list[tuple[str, str, str]], policy: BadTexts, split: str) -> list[tuple[str, str, str]]:
    """Leave out (``skip``) or refuse (``error``) rows whose text or label is empty or only whitespace.

    Args:
        rows: ``(text, label, where)``, ``where`` naming the file and line (or the file) for the message.
        policy: the ``data.bad_texts`` value.
        split: the split's name, for the message.
    """
    bad = [(where, "text" if not text.strip() else "label") for text, label, where in rows
           if not text.strip() or not label]
    if not bad:
        return rows
    if policy == "error":
        listing = ", ".join(f"{w} (empty {what})" for w, what in bad[:5])
        raise ValueError(f"data: {len(bad)} {split} row(s) have an empty or whitespace-only text or label: {listing}"
                         f"{' ...' if len(bad) > 5 else ''}; fix them, or set data.bad_texts=skip to leave them out")
    from lightning.pytorch.utilities import rank_zero_warn

    rank_zero_warn(f"transfer_lit data: data.bad_texts='skip' left out {len(bad)} {split} row(s) with an empty text "
                   f"or label, e.g. {[w for w, _ in bad[:3]]}")
    return [r for r in rows if r[0].strip() and r[1]]
