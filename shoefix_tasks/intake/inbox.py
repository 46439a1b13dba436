"""What may be read from an inbox, and how: names and symlinks that could escape it are refused,
and a file is opened read-only by its checked real path (never following a symlink, never
blocking on a FIFO). Local paths and fsspec URIs alike.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import unicodedata
from dataclasses import dataclass
from typing import IO, Any

from shoefix_tasks.config import Settings
from shoefix_tasks.intake.formats import PARSERS

MAX_NAME_BYTES = 1000  # the ledger's name columns are String(1000)


@dataclass
class InboxFile:
    name: str  # relative to the inbox root
    path: str  # as the filesystem knows it
    unsafe: str | None = None  # why it is refused, if it is
    real: str | None = None  # local files: the resolved path that is opened (never a symlink)


def unsafe_name(name: str) -> str | None:
    """Why an inbox-relative name is refused, or None. Unicode letters and spaces are fine (experts
    name files in Chinese); what could escape the inbox, spoof a log line or pass for an option is not."""
    if not name:
        return "empty file name"
    if any(unicodedata.category(c) == "Cs" for c in name):
        return "file name is not valid UTF-8"
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in name):
        return "file name contains control or invisible formatting characters"
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        return f"file name longer than {MAX_NAME_BYTES} bytes"
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or ".." in parts:
        return "file name escapes the inbox"
    if any(p.startswith("-") for p in parts):
        return "a path component starts with '-' (it would read as a command-line option)"
    return None


def _is_local(fs: Any) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return bool({"file", "local"} & set(protocols))


def list_inbox(inbox: str) -> tuple[Any, list[InboxFile]]:
    """(filesystem, files) for a path or URI, sorted by name; refusals are listed too."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(inbox)
    if not fs.exists(root):
        raise FileNotFoundError(f"inbox {inbox} does not exist")
    root = root.rstrip("/")
    local = _is_local(fs)
    real_root = os.path.realpath(root) if local else root
    out = []
    for path in sorted(fs.find(root)):
        name = path[len(root):].lstrip("/")
        if os.path.splitext(name)[1].lower() not in PARSERS:
            continue
        why, real = unsafe_name(name), None
        if why is None and local:
            real = os.path.realpath(path)
            if os.path.commonpath([real, real_root]) != real_root:
                why = "symlink points outside the inbox"
            elif not os.path.isfile(real):
                why = "not a regular file"
        out.append(InboxFile(name, path, why, real))
    return fs, out


class HashingReader(io.RawIOBase):
    """Reads at most `limit` bytes of `fh`, hashing what it reads: the parse pass proves it read
    exactly the bytes the first pass hashed (a file rewritten in between is caught)."""

    def __init__(self, fh: IO[bytes], limit: int) -> None:
        self.fh, self.left, self.digest = fh, limit, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        if self.left <= 0:
            return 0
        data = self.fh.read(min(len(buf), self.left))
        buf[:len(data)] = data
        self.digest.update(data)
        self.left -= len(data)
        return len(data)


def open_file(fs: Any, f: InboxFile) -> IO[bytes]:
    """Read-only. A local file is opened by its checked real path without following a symlink and
    without blocking (a FIFO swapped in after listing is refused, not waited on)."""
    if f.real is None:
        return fs.open(f.path, "rb")
    fd = os.open(f.real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{f.name!r} is no longer a regular file")
    return os.fdopen(fd, "rb")


def pending_inbox_files(settings: Settings) -> list[dict[str, Any]]:
    """Inbox files not processed yet, judged by (name, size) against the ledger: a cheap check for
    announcing new Q&A (no file is read). `collect_qa` still decides by content hash, so a false
    positive costs one run that finds nothing new."""
    import sqlalchemy as sa

    from shoefix_tasks.store import ledger

    fs, listing = list_inbox(settings.inbox)
    f_t = ledger.inbox_files
    with ledger.engine_for(settings.ledger_url).connect() as conn:
        done = set(conn.execute(sa.select(f_t.c.name, f_t.c.size).where(f_t.c.status == "processed")).tuples())
    out = []
    for f in listing:
        if f.unsafe is None and (f.name, size := int(fs.size(f.path))) not in done:
            out.append({"name": f.name, "size": size})
    return out
