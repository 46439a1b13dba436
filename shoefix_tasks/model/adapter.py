"""The adapter as a release unit: PEFT safetensors only, a sha256 manifest, the base identity.

The manifest is written last (after every other file is complete) and names every file with its
hash; `verify_adapter` refuses a folder with a missing, extra, altered or pickle file. Loading
therefore never deserializes pickle and never uses a partially written or tampered adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shoefix_tasks.records import sha256_file

MANIFEST = "shoefix_manifest.json"
ALLOWED_SUFFIXES = {".safetensors", ".json", ".md", ".txt", ".jinja"}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


class AdapterIntegrityError(RuntimeError):
    """The adapter folder does not match its manifest, or holds a forbidden file."""


def _payload_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, base: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    files = _payload_files(folder)
    bad = [p.name for p in files if p.suffix in PICKLE_SUFFIXES or p.suffix not in ALLOWED_SUFFIXES]
    if bad:
        raise AdapterIntegrityError(f"refusing to release non-safetensors files: {bad}")
    if not any(p.suffix == ".safetensors" for p in files):
        raise AdapterIntegrityError(f"{folder} holds no safetensors weights")
    manifest = {
        "format": "shoefix-adapter/1",
        "files": {str(p.relative_to(folder)): sha256_file(p) for p in files},
        "base": {k: base.get(k) for k in ("name", "spec", "revision", "sha256", "tokenizer_sha256")},
        **(extra or {}),
    }
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    tmp.replace(folder / MANIFEST)
    return manifest


def adapter_digest(manifest: dict[str, Any]) -> str:
    """One hash for an adapter's content: the sha256 of its manifest's file hashes. Equal digests
    mean byte-identical adapters, so caches and checks key on this, never on a version number."""
    import hashlib

    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()


def verify_adapter(folder: Path) -> dict[str, Any]:
    """Return the manifest if every file matches it; raise AdapterIntegrityError otherwise."""
    path = folder / MANIFEST
    if not path.is_file():
        raise AdapterIntegrityError(f"{folder}: no {MANIFEST} (incomplete or foreign adapter)")
    manifest = json.loads(path.read_text())
    listed = manifest.get("files", {})
    present = {str(p.relative_to(folder)): p for p in _payload_files(folder)}
    pickles = [n for n in present if Path(n).suffix in PICKLE_SUFFIXES]
    if pickles:
        raise AdapterIntegrityError(f"{folder}: pickle files are never loaded: {pickles}")
    missing, extra = set(listed) - set(present), set(present) - set(listed)
    if missing or extra:
        raise AdapterIntegrityError(f"{folder}: files differ from manifest (missing {sorted(missing)}, "
                                    f"unexpected {sorted(extra)})")
    for name, digest in listed.items():
        if sha256_file(present[name]) != digest:
            raise AdapterIntegrityError(f"{folder}: {name} does not match its sha256 in the manifest")
    return manifest
