"""The served artifact of a registered version, and opening the champion as it serves.

A version's adapter (PEFT safetensors + manifest) is the unit of release; what llama.cpp serves is
derived from it when the version is registered: the adapter as a GGUF LoRA (model/gguf_adapter.py),
logged as the pyfunc artifact `served_adapter` beside `adapter`. Its sha256 and the base GGUF's are
recorded twice, as version tags (`served_adapter_sha256`, `served_base_sha256`, `serving_engine`) and
in the pyfunc's model_config, and every opening recomputes both and refuses a mismatch
(ServedArtifactMismatch), as adapters are refused against their manifest. The conversion is
deterministic, so a retried registration derives the same bytes.

A base that ships no GGUF (or an adapter a GGUF LoRA cannot express) serves with transformers:
`serving_engine` says which. Versions registered before this existed have no tag: they open with the
engine evaluation picks for their base (`auto`), the adapter converted on the fly from its verified
folder.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from shoefix_tasks.config import Settings
from shoefix_tasks.errors import PermanentError, ServedArtifactMismatch
from shoefix_tasks.records import sha256_file

log = logging.getLogger(__name__)
ARTIFACT = "served_adapter"  # the pyfunc artifact name of the adapter GGUF
TAG_ENGINE, TAG_ADAPTER, TAG_BASE = "serving_engine", "served_adapter_sha256", "served_base_sha256"


class NoServedVersion(PermanentError, LookupError):
    """No registry version holds the alias asked for."""


def derive_served(adapter_dir: Path, base_model: str, work: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(extra pyfunc artifacts, tags) for a version of `base_model` with this adapter: the adapter GGUF
    written under `work` for a base that ships as a GGUF, nothing for a transformers base."""
    from shoefix_tasks.model.engines import choose_engine, shipped_gguf
    from shoefix_tasks.model.gguf_adapter import UnsupportedAdapter, write_adapter_gguf

    if choose_engine(base_model) != "llama.cpp":
        return {}, {TAG_ENGINE: "transformers"}
    base = shipped_gguf(base_model)
    work.mkdir(parents=True, exist_ok=True)
    try:
        info = write_adapter_gguf(adapter_dir, base, work / "adapter.gguf")
    except UnsupportedAdapter as err:
        log.warning("served with transformers: %s", err)
        return {}, {TAG_ENGINE: "transformers", "serving_engine_reason": str(err)[:500]}
    return ({ARTIFACT: str(work / "adapter.gguf")},
            {TAG_ENGINE: "llama.cpp", TAG_ADAPTER: info["sha256"], TAG_BASE: sha256_file(base)})


def check_served(gguf: Path, expected: dict[str, str], base_gguf: Path | None, what: str) -> None:
    """Recompute the adapter GGUF's and the base GGUF's sha256 and refuse any difference from the record."""
    actual = sha256_file(gguf)
    if actual != expected.get(TAG_ADAPTER):
        raise ServedArtifactMismatch(f"{what}: served adapter {gguf.name} has sha256 {actual[:12]}, recorded "
                                     f"{str(expected.get(TAG_ADAPTER))[:12]}: refusing to serve it")
    if base_gguf is not None and sha256_file(base_gguf) != expected.get(TAG_BASE):
        raise ServedArtifactMismatch(f"{what}: base {base_gguf.name} is not the GGUF recorded with the version "
                                     f"({str(expected.get(TAG_BASE))[:12]})")


def _mlmodel(model_id: str) -> tuple[str, dict[str, Any]]:
    """(artifact root, python_function flavor) of a logged model."""
    import mlflow
    import yaml

    from shoefix_tasks.registry.versions import _client

    root = _client().get_logged_model(model_id).artifact_location
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/MLmodel", dst_path=tmp)
        flavor = yaml.safe_load(Path(path).read_text())["flavors"]["python_function"]
    return root, flavor


def served_uri(model_id: str) -> str | None:
    root, flavor = _mlmodel(model_id)
    entry = (flavor.get("artifacts") or {}).get(ARTIFACT)
    return f"{root}/{entry['path']}" if entry else None


def fetch_served(uri: str, expected: dict[str, str], settings: Settings, what: str) -> Path:
    """The served adapter GGUF, downloaded once into a cache named by its recorded sha256 and checked
    against it on every use (a file altered in the artifact store or in the cache is refused)."""
    import mlflow

    cache = settings.home / "cache" / "served"
    target = cache / f"{expected[TAG_ADAPTER]}.gguf"
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="download-", dir=cache))
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
            check_served(local, expected, None, what)
            local.replace(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    check_served(target, expected, None, what)
    return target


def verify_upload(model_id: str, tags: dict[str, str], settings: Settings) -> None:
    """After logging: the served adapter downloads back with its recorded hash (else no version)."""
    uri = served_uri(model_id)
    if uri is None:
        raise ServedArtifactMismatch(f"logged model {model_id} has no {ARTIFACT} artifact")
    check = Path(tempfile.mkdtemp(prefix="served-upload-", dir=settings.home))
    try:
        import mlflow

        check_served(Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(check))), tags, None,
                     f"upload of {model_id}")
    finally:
        shutil.rmtree(check, ignore_errors=True)


def open_champion(settings: Settings, alias: str = "champion") -> tuple[Any, dict[str, Any]]:
    """(Engine, info) for the version holding `alias`, exactly as it was registered: the adapter
    verified against its manifest and digest, the served GGUF and the base GGUF against their recorded
    hashes. Answers are raw model output: callers apply registry/safety before showing them.
    info: version, run_id, engine, artifact_sha256, base_model, max_new_tokens, repetition_penalty, load_s."""
    import json

    from shoefix_tasks.model.engines import open_engine, shipped_gguf
    from shoefix_tasks.registry import versions
    from shoefix_tasks.store import tracking

    t0 = time.perf_counter()
    tracking.configure(settings)
    version = versions.version_by_alias(alias)
    if version is None:
        raise NoServedVersion(f"no version of the registered model holds alias {alias!r}")
    what = f"version {version.version}"
    adapter_dir = versions.download_adapter(version, settings)
    flavor = _mlmodel(version.source.removeprefix("models:/"))[1] if (version.source or "").startswith("models:/m-") \
        else {}
    cfg = {**(flavor.get("config") or {}), **json.loads(version.tags.get("serving", "{}"))}
    base_model = cfg.get("base_model") or version.tags.get("base_model")
    if not base_model:
        raise NoServedVersion(f"{what} records no base model")
    penalty = float(cfg.get("repetition_penalty", 1.0))
    kind, adapter_gguf, sha = version.tags.get(TAG_ENGINE), None, None
    if kind == "llama.cpp":
        uri = served_uri(version.source.removeprefix("models:/"))
        if uri is None:
            raise ServedArtifactMismatch(f"{what} is tagged for llama.cpp but has no {ARTIFACT} artifact")
        adapter_gguf = fetch_served(uri, version.tags, settings, what)
        check_served(adapter_gguf, version.tags, shipped_gguf(base_model), what)
        sha = version.tags[TAG_ADAPTER]
    elif kind is None:
        log.warning("%s predates served artifacts: opening it with the engine evaluation would pick", what)
    engine = open_engine(base_model, adapter_dir, settings, dtype=cfg.get("dtype", "float32"),
                         repetition_penalty=penalty, engine=kind or "auto", label=f"v{version.version}",
                         adapter_gguf=adapter_gguf)
    info = {"version": int(version.version), "run_id": version.run_id, "engine": engine.name,
            "artifact_sha256": sha or version.tags.get("adapter_digest"), "base_model": base_model,
            "max_new_tokens": int(cfg.get("max_new_tokens", 160)), "repetition_penalty": penalty,
            "load_s": round(time.perf_counter() - t0, 2)}
    log.info("opened %s (%s) in %.1f s", what, engine.name, info["load_s"])
    return engine, info
