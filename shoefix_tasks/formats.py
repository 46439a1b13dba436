"""Inbox file formats: JSONL, CSV and a simple Markdown Q&A format, parsed from bytes.

Every parser returns `(lines, truncated)`: one `ParsedLine` per record seen (parsed or not,
with its position and raw bytes), and whether the file looks unfinished (still being written).
No parser raises on bad input: a record that cannot be read becomes a ParsedLine with an error.

Markdown format (records separated by a line `---`):

    Q: How long should wet leather boots dry?
    A: About 24–48 hours at room temperature...
       (continuation lines belong to the answer)
    topic: materials
    lang: en
    id: mat-900-en
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from typing import Any


@dataclass
class ParsedLine:
    line_no: int
    raw: bytes
    record: dict[str, Any] | None  # None when the record did not parse
    error: str | None = None


def _decode(raw: bytes) -> tuple[str | None, str | None]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as err:
        return None, f"malformed UTF-8 at byte {err.start}"


def parse_jsonl(data: bytes) -> tuple[list[ParsedLine], bool]:
    chunks = data.split(b"\n")
    ends_clean = data.endswith(b"\n") or not data
    if ends_clean and chunks and chunks[-1] == b"":
        chunks.pop()
    out: list[ParsedLine] = []
    for i, raw in enumerate(chunks, start=1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        if i == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        text, err = _decode(raw)
        if text is None:
            out.append(ParsedLine(i, raw, None, err))
            continue
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            out.append(ParsedLine(i, raw, None, f"invalid JSON: {getattr(exc, 'msg', exc)}"))
            continue
        if not isinstance(obj, dict):
            out.append(ParsedLine(i, raw, None, f"expected a JSON object, got {type(obj).__name__}"))
            continue
        out.append(ParsedLine(i, raw, obj))
    truncated = not ends_clean and bool(out) and out[-1].record is None
    return out, truncated


def parse_csv(data: bytes) -> tuple[list[ParsedLine], bool]:
    """RFC 4180 CSV with a header row; BOM, CRLF and quoted embedded newlines are fine. Extra
    columns are kept as extra fields (validation ignores unknown fields)."""
    text, err = _decode(data[3:] if data.startswith(b"\xef\xbb\xbf") else data)
    if text is None:
        # decode per physical line so that one bad line does not sink the file
        text = data.decode("utf-8", errors="replace")
        bad_file_error = err
    else:
        bad_file_error = None
    truncated = bool(data) and not data.endswith((b"\n", b"\r")) and text.count('"') % 2 == 1
    out: list[ParsedLine] = []
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if header is None:
            return [], False
        header = [h.strip().lower() for h in header]
        for n, row in enumerate(reader, start=1):
            raw = ",".join(row).encode("utf-8", errors="replace")
            if not any(cell.strip() for cell in row):
                continue
            if bad_file_error and "\ufffd" in "".join(row):
                out.append(ParsedLine(n, raw, None, bad_file_error))
                continue
            if len(row) < len(header):
                out.append(ParsedLine(n, raw, None, f"row has {len(row)} columns, header has {len(header)}"))
                continue
            rec: dict[str, Any] = dict(zip(header, row, strict=False))
            for key in ("key_points", "key_facts", "source"):
                if isinstance(rec.get(key), str) and rec[key].strip():
                    rec[key] = [p.strip() for p in rec[key].split("|") if p.strip()]
            out.append(ParsedLine(n, raw, rec))
    except csv.Error as exc:
        out.append(ParsedLine(len(out) + 1, b"", None, f"CSV error: {exc}"))
    return out, truncated


_MD_KEY = re.compile(r"^(q|a|question|answer|topic|lang|id|qid|source|contributor|created)\s*:\s?(.*)$", re.I)
_MD_ALIASES = {"q": "question", "a": "answer"}


def parse_markdown(data: bytes) -> tuple[list[ParsedLine], bool]:
    text, err = _decode(data)
    if text is None:
        return [ParsedLine(1, data[:4096], None, err)], False
    out: list[ParsedLine] = []
    blocks = re.split(r"(?m)^---\s*$", text)
    for n, block in enumerate(blocks, start=1):
        if not block.strip():
            continue
        rec: dict[str, Any] = {}
        current = None
        for line in block.splitlines():
            m = _MD_KEY.match(line.strip()) if not line.startswith((" ", "\t")) or current is None else None
            if m:
                current = _MD_ALIASES.get(m.group(1).lower(), m.group(1).lower())
                rec[current] = m.group(2).strip()
            elif current in ("question", "answer") and line.strip():
                rec[current] = (rec[current] + " " + line.strip()).strip()
            elif line.strip() and not line.lstrip().startswith("#"):
                current = None
        raw = block.strip().encode("utf-8")
        if "question" not in rec and "answer" not in rec:
            out.append(ParsedLine(n, raw, None, "markdown block has no 'Q:' or 'A:' line"))
        else:
            out.append(ParsedLine(n, raw, rec))
    return out, False


PARSERS = {".jsonl": parse_jsonl, ".csv": parse_csv, ".md": parse_markdown}


def parse_bytes(suffix: str, data: bytes) -> tuple[list[ParsedLine], bool]:
    parser = PARSERS.get(suffix.lower())
    if parser is None:
        raise ValueError(f"unsupported inbox format {suffix!r}; supported: {sorted(PARSERS)}")
    return parser(data)
