"""Inbox file formats: JSONL, CSV and a simple Markdown Q&A format, parsed as streams.

A file is read twice, never whole: `inspect_stream` hashes it, then `iter_records` yields one
`ParsedLine` per record seen (parsed or not, with its position and raw bytes). Memory is bounded
by `max_record_bytes`, not by the file: a record longer than that is reported as an error with
only its first `RAW_KEEP` bytes kept, and the rest of it is skipped unread into memory. No parser
raises on bad input.

A file that is still being written (or whose writer died) ends in a cut-off record. The parser
that meets it marks that last record `truncated` (the collector decides whether to wait for the
writer or to quarantine the tail): in JSONL, a last line with no newline after it that does not
parse; in CSV, a record that reaches the end of the file inside an open quoted field (not parsed),
or a last row with no line break after it; in Markdown, a last block whose last line has no line
break. The last two may parse (a cut at a comma or mid-word still reads as a record), so they keep
what parsed: the collector waits for their writer like any cut-off record, then judges them as they
stand (a block needs no closing `---`, so a finished file without a final newline is read in full
once its writer is taken to have stopped).

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
import hashlib
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import IO, Any

MAX_RECORD_BYTES = 1 << 20  # 1 MiB: a valid record is < 5,000 characters (TEXT_BOUNDS) plus metadata
RAW_KEEP = 64 << 10  # bytes of an oversize record kept in the ledger, for the audit
_CHUNK = 1 << 20
_BOM = b"\xef\xbb\xbf"


@dataclass
class ParsedLine:
    line_no: int
    raw: bytes
    record: dict[str, Any] | None  # None when the record did not parse
    error: str | None = None
    check: str = "parse"  # the ledger's check name when it did not parse: parse | oversize | malformed_csv_row | truncated
    # the file's last record, cut off or possibly so (a CSV row with no line break after it): the
    # file waits for its writer (see the module docstring); `record` is None when it cannot parse
    truncated: bool = False


def _cut(pl: ParsedLine, why: str) -> ParsedLine:
    """The last record, cut off: not parsed, whatever part of it did parse (never half a record)."""
    return ParsedLine(pl.line_no, pl.raw, None, f"truncated: {why}", "truncated", True)


@dataclass
class FileFacts:
    sha256: str
    size: int


def _decode(raw: bytes) -> tuple[str | None, str | None]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as err:
        return None, f"malformed UTF-8 at byte {err.start}"


def _oversize(i: int, raw: bytes, n: int, limit: int) -> ParsedLine:
    why = f"record of {n:,} bytes exceeds the {limit:,}-byte limit (first {RAW_KEEP:,} bytes kept)"
    return ParsedLine(i, raw, None, why, "oversize")


def _jsonl_line(i: int, raw: bytes) -> ParsedLine:
    if i == 1 and raw.startswith(_BOM):
        raw = raw[3:]
    text, err = _decode(raw)
    if text is None:
        return ParsedLine(i, raw, None, err)
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        return ParsedLine(i, raw, None, f"invalid JSON: {getattr(exc, 'msg', exc)}")
    if not isinstance(obj, dict):
        return ParsedLine(i, raw, None, f"expected a JSON object, got {type(obj).__name__}")
    return ParsedLine(i, raw, obj)


def inspect_stream(fh: IO[bytes]) -> FileFacts:
    """One pass over the bytes: sha256 and size (what identifies a file's state in the ledger)."""
    digest, size = hashlib.sha256(), 0
    while block := fh.read(_CHUNK):
        digest.update(block)
        size += len(block)
    return FileFacts(digest.hexdigest(), size)


def _bounded_lines(fh: IO[bytes], limit: int) -> Iterator[tuple[bytes, int, bool]]:
    """(line, full length, ended with a newline) per physical line; a line longer than `limit` is
    cut to RAW_KEEP bytes and the rest is read and dropped in chunks, so no line is ever held whole."""
    while line := fh.readline(limit + 1):
        if len(line) <= limit or line.endswith(b"\n"):
            yield line, len(line), line.endswith(b"\n")
            continue
        n = len(line)
        while (more := fh.readline(_CHUNK)) and not more.endswith(b"\n"):
            n += len(more)
        yield line[:RAW_KEEP], n + len(more), more.endswith(b"\n")


def iter_jsonl(fh: IO[bytes], max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[ParsedLine]:
    for i, (line, n, ended) in enumerate(_bounded_lines(fh, max_record_bytes), start=1):
        raw = line.rstrip(b"\n").rstrip(b"\r")
        if n > max_record_bytes:
            pl = _oversize(i, raw, n, max_record_bytes)
        elif raw.strip():
            pl = _jsonl_line(i, raw)
        else:
            continue
        # only the file's last line can lack its newline: unparseable there, it is a cut-off write
        yield _cut(pl, f"last line has no newline and {pl.error}") if not ended and pl.record is None else pl


class _RecordLines:
    """Physical lines (text) for csv.reader, remembering the lines of the record being read and
    refusing to let one record grow past the limit (csv.reader pulls lines only as it needs them).
    `exhausted`: the reader asked past the end of the file, which it does only from inside an open
    quoted field (a complete record ends at its line's end); `ended`: the last line read ended
    with a line break."""

    def __init__(self, text: IO[str], limit: int) -> None:
        self.text, self.limit = text, limit
        self.lines: list[str] = []
        self.chars = 0
        self.exhausted = False
        self.ended = True

    def __iter__(self) -> _RecordLines:
        return self

    def __next__(self) -> str:
        line = self.text.readline(self.limit + 1)
        if not line:
            self.exhausted = True
            raise StopIteration
        self.chars += len(line)
        if self.chars > self.limit:
            n = self.chars
            while not line.endswith(("\n", "\r")) and (line := self.text.readline(_CHUNK)):
                n += len(line)
            self.ended = line.endswith(("\n", "\r"))
            raise _TooLong(n)
        self.lines.append(line)
        self.ended = line.endswith(("\n", "\r"))
        return line

    def take(self) -> bytes:
        raw = "".join(self.lines).rstrip("\r\n").encode("utf-8", errors="replace")
        self.lines, self.chars = [], 0
        return raw


class _TooLong(Exception):
    def __init__(self, n: int) -> None:
        self.n = n


def _csv_row(n: int, raw: bytes, row: list[str], header: list[str]) -> ParsedLine:
    if "\ufffd" in raw.decode("utf-8"):
        return ParsedLine(n, raw, None, "malformed UTF-8 in row")
    if len(row) != len(header):  # a cell without a column (or a column without a cell): misaligned, not guessed at
        return ParsedLine(n, raw, None, f"malformed_csv_row: {len(row)} cells, header has {len(header)}",
                          "malformed_csv_row")
    rec: dict[str, Any] = dict(zip(header, row, strict=True))
    for key in ("key_points", "key_facts", "source"):
        if isinstance(rec.get(key), str) and rec[key].strip():
            rec[key] = [p.strip() for p in rec[key].split("|") if p.strip()]
    return ParsedLine(n, raw, rec)


def iter_csv(fh: IO[bytes], max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[ParsedLine]:
    """RFC 4180 CSV with a header row; BOM, CRLF and quoted embedded newlines are fine. Every row
    must have exactly as many cells as the header: columns the header names beyond the known
    fields are kept as extra fields (validation ignores unknown fields), but a row with more or
    fewer cells than the header is quarantined (`malformed_csv_row`), since its cells cannot be
    matched to columns. A row with bytes that are not UTF-8 (decoded as U+FFFD) is an error; the
    other rows of the file proceed. Truncation: see the module docstring."""
    text = io.TextIOWrapper(fh, encoding="utf-8-sig", errors="replace", newline="")
    src = _RecordLines(text, max_record_bytes)
    reader = csv.reader(src)
    header: list[str] | None = None
    n = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except _TooLong as big:
            n += 1
            pl = _oversize(n, src.take()[:RAW_KEEP], big.n, max_record_bytes)
            yield pl if src.ended else _cut(pl, f"last record has no line break after it and {pl.error}")
            continue
        except csv.Error as exc:
            n += 1
            yield ParsedLine(n, src.take()[:RAW_KEEP], None, f"CSV error: {exc}")
            if src.exhausted:
                return
            continue
        raw = src.take()
        if header is None:
            if src.exhausted:  # the header itself is cut off: nothing after it can be read as rows
                yield _cut(ParsedLine(0, raw, None), "the header row ends inside an open quoted field")
                return
            header = [h.strip().lower() for h in row]
            continue
        if not any(cell.strip() for cell in row) and not src.exhausted:
            continue
        n += 1
        pl = _csv_row(n, raw, row, header)
        if src.exhausted:
            yield _cut(pl, "the file ends inside an open quoted field")
        elif not src.ended:  # no line break after the last row: it may still be being written, even
            # when what is there parses (a cell cut at a comma or mid-word): waits like a cut-off record;
            # once its writer is taken to have stopped it is judged as it stands (collect.py)
            yield replace(pl, truncated=True)
        else:
            yield pl


_MD_KEY = re.compile(r"^(q|a|question|answer|topic|lang|id|qid|source|contributor|created)\s*:\s?(.*)$", re.I)
_MD_ALIASES = {"q": "question", "a": "answer"}
_MD_SEP = re.compile(rb"^---\s*$")


def _md_block(n: int, lines: list[bytes], size: int, limit: int) -> ParsedLine | None:
    data = b"".join(lines)
    if size > limit:
        return _oversize(n, data.strip()[:RAW_KEEP], size, limit)
    text, err = _decode(data)
    if text is None:
        return ParsedLine(n, data.strip(), None, err)
    if not text.strip():
        return None
    rec: dict[str, Any] = {}
    current = None
    for line in text.splitlines():
        m = _MD_KEY.match(line.strip()) if not line.startswith((" ", "\t")) or current is None else None
        if m:
            current = _MD_ALIASES.get(m.group(1).lower(), m.group(1).lower())
            rec[current] = m.group(2).strip()
        elif current in ("question", "answer") and line.strip():
            rec[current] = (rec[current] + " " + line.strip()).strip()
        elif line.strip() and not line.lstrip().startswith("#"):
            current = None
    raw = text.strip().encode("utf-8")
    if "question" not in rec and "answer" not in rec:
        return ParsedLine(n, raw, None, "markdown block has no 'Q:' or 'A:' line")
    return ParsedLine(n, raw, rec)


def iter_markdown(fh: IO[bytes], max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[ParsedLine]:
    """Blocks between `---` lines; a block is decoded on its own, so one bad byte sinks one block."""
    n, lines, size, last_ended = 1, [], 0, True
    for line, full, ended in _bounded_lines(fh, max_record_bytes):
        last_ended = ended
        if _MD_SEP.match(line.rstrip(b"\r\n")) and full == len(line):
            if (pl := _md_block(n, lines, size, max_record_bytes)) is not None:
                yield pl
            n, lines, size = n + 1, [], 0
            continue
        size += full
        if size <= max_record_bytes:
            lines.append(line)
        elif sum(map(len, lines)) < RAW_KEEP:
            lines.append(line[:RAW_KEEP])
    if (pl := _md_block(n, lines, size, max_record_bytes)) is not None:
        yield pl if last_ended else replace(pl, truncated=True)  # no line break at the end: maybe cut off


PARSERS = {".jsonl": iter_jsonl, ".csv": iter_csv, ".md": iter_markdown}


def iter_records(suffix: str, fh: IO[bytes], max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[ParsedLine]:
    parser = PARSERS.get(suffix.lower())
    if parser is None:
        raise ValueError(f"unsupported inbox format {suffix!r}; supported: {sorted(PARSERS)}")
    return parser(fh, max_record_bytes)


def parse_bytes(suffix: str, data: bytes, max_record_bytes: int = MAX_RECORD_BYTES) -> tuple[list[ParsedLine], bool]:
    """Parse an in-memory file: (records, whether its last record is cut off). The streaming path,
    on a BytesIO."""
    lines = list(iter_records(suffix, io.BytesIO(data), max_record_bytes))
    return lines, bool(lines) and lines[-1].truncated


def parse_jsonl(data: bytes) -> tuple[list[ParsedLine], bool]:
    return parse_bytes(".jsonl", data)


def parse_csv(data: bytes) -> tuple[list[ParsedLine], bool]:
    return parse_bytes(".csv", data)


def parse_markdown(data: bytes) -> tuple[list[ParsedLine], bool]:
    return parse_bytes(".md", data)
