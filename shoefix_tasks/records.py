"""Q&A records: their normal form, content hashes, and JSONL I/O (the fields are the GX suite's: intake/suite.py).

A record's *content hash* is over its normalized question and answer only (case, Unicode form and
white space folded), so the same Q&A arriving twice, from two files or with cosmetic changes,
hashes the same. Its *question key* hashes the normalized question alone.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

_SPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """NFKC, lower-case, collapse white space: the form used for hashing and duplicate checks."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip().lower()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Streaming sha256 of a file (weights can be gigabytes: never read whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def content_hash(question: str, answer: str) -> str:
    return sha256_text(normalize_text(question) + "\x1f" + normalize_text(answer))


def question_key(question: str) -> str:
    return sha256_text(normalize_text(question))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def iter_jsonl(paths: Iterable[Path]) -> Iterator[dict[str, Any]]:
    for path in paths:
        yield from read_jsonl(path)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write atomically (temp file + rename), so a crash never leaves half a file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def rows_hash(rows: Iterable[dict[str, Any]]) -> str:
    """Order-independent hash of a set of records (by their content hashes)."""
    hashes = sorted(content_hash(r["question"], r["answer"]) for r in rows)
    return sha256_text("\n".join(hashes))


def load_eval_set(data_dir: Path, kind: str, languages: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The frozen holdout (`kind='holdout'`) or guard set, sorted by id for a stable order."""
    rows = list(iter_jsonl(sorted((data_dir / kind).glob("*.jsonl"))))
    if languages is not None:
        wanted = set(languages)
        rows = [r for r in rows if r["lang"] in wanted]
    return sorted(rows, key=lambda r: r["id"])
