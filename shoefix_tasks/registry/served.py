"""The served artifact of a registered version, and opening the champion as it serves.

A version's adapter (PEFT safetensors + manifest) is the unit of release; what llama.cpp serves is
derived from it when the version is registered: the shipped base GGUF with the adapter merged in
(model/gguf_merge.py, form `gguf-merged-q8_0`), logged as the pyfunc artifact `served_model` beside
`adapter`. Its sha256 and the base GGUF's are recorded twice, as version tags (`served_form`,
`served_model_sha256`, `served_base_sha256`, `serving_engine`) and in the pyfunc's model_config, and
every opening recomputes both and refuses a mismatch (ServedArtifactMismatch), as adapters are refused
against their manifest. The derivation is deterministic, so a retried registration derives the same
bytes, and evaluation (which derives it from the same adapter) scores the bytes that are served.

Versions registered before the merge carry the adapter alone as a GGUF LoRA (`served_adapter`,
`served_adapter_sha256`, form `gguf-lora`) and keep opening that way, checked the same way. A base that
ships no GGUF (or an adapter a GGUF LoRA cannot express) serves with transformers: `serving_engine` says
which. Versions registered before any of this have no tag: they open with the engine evaluation picks
for their base (`auto`), the served form derived on the fly from the verified adapter.
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
from shoefix_tasks.model.engines import FORM_LORA, FORM_MERGED
from shoefix_tasks.records import sha256_file

log = logging.getLogger(__name__)
TAG_ENGINE, TAG_FORM, TAG_BASE = "serving_engine", "served_form", "served_base_sha256"
# served form -> (pyfunc artifact name, tag holding its sha256)
FORMS = {FORM_MERGED: ("served_model", "served_model_sha256"),
         FORM_LORA: ("served_adapter", "served_adapter_sha256")}
MODEL_ARTIFACT, TAG_SHA = FORMS[FORM_MERGED]  # what registration derives now
# The names of the runtime-LoRA form, kept: MLflow models-from-code copies serving.py into each logged model
# and runs that copy at load, so a version logged before the merge imports these from this module.
ARTIFACT, TAG_ADAPTER = FORMS[FORM_LORA]
SERVED_TAGS = (TAG_ENGINE, TAG_FORM, TAG_BASE, "serving_engine_reason", *(tag for _, tag in FORMS.values()))


class NoServedVersion(PermanentError, LookupError):
    """No registry version holds the alias asked for."""


def served_form(tags: dict[str, str]) -> str | None:
    """The served form a version's tags (or model_config) record; None for a version without one."""
    if tags.get(TAG_FORM):
        return tags[TAG_FORM]
    return FORM_LORA if tags.get(FORMS[FORM_LORA][1]) else None


def derive_served(adapter_dir: Path, base_model: str, work: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(extra pyfunc artifacts, tags) for a version of `base_model` with this adapter: the merged GGUF
    written under `work` for a base that ships as a GGUF, nothing for a transformers base."""
    from shoefix_tasks.model.engines import choose_engine, shipped_gguf
    from shoefix_tasks.model.gguf_adapter import UnsupportedAdapter
    from shoefix_tasks.model.gguf_merge import SERVED_TYPE, write_merged_gguf

    if choose_engine(base_model) != "llama.cpp":
        return {}, {TAG_ENGINE: "transformers"}
    base = shipped_gguf(base_model)
    work.mkdir(parents=True, exist_ok=True)
    try:
        info = write_merged_gguf(base, adapter_dir, work / "model.gguf", SERVED_TYPE)
    except UnsupportedAdapter as err:
        log.warning("served with transformers: %s", err)
        return {}, {TAG_ENGINE: "transformers", "serving_engine_reason": str(err)[:500]}
    return ({MODEL_ARTIFACT: str(work / "model.gguf")},
            {TAG_ENGINE: "llama.cpp", TAG_FORM: FORM_MERGED, TAG_SHA: info["sha256"], TAG_BASE: sha256_file(base)})


def check_served(gguf: Path, expected: dict[str, str], base_gguf: Path | None, what: str) -> None:
    """Recompute the served GGUF's and the base GGUF's sha256 and refuse any difference from the record."""
    form = served_form(expected)
    if form not in FORMS:
        raise ServedArtifactMismatch(f"{what}: unknown served form {form!r}: refusing to serve it")
    tag = FORMS[form][1]
    actual = sha256_file(gguf)
    if actual != expected.get(tag):
        raise ServedArtifactMismatch(f"{what}: served file {gguf.name} ({form}) has sha256 {actual[:12]}, "
                                     f"recorded {str(expected.get(tag))[:12]}: refusing to serve it")
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


def recorded_tags(model_id: str) -> dict[str, str]:
    """The served tags a logged model recorded in its model_config when it was logged: what a retried
    registration tags the version with (deriving again could give other bytes under newer code)."""
    cfg = _mlmodel(model_id)[1].get("config") or {}
    return {k: str(cfg[k]) for k in SERVED_TAGS if k in cfg}


def served_uri(model_id: str, form: str = FORM_MERGED) -> str | None:
    root, flavor = _mlmodel(model_id)
    entry = (flavor.get("artifacts") or {}).get(FORMS[form][0])
    return f"{root}/{entry['path']}" if entry else None


def fetch_served(uri: str, expected: dict[str, str], settings: Settings, what: str,
                 base_gguf: Path | None = None) -> Path:
    """The served GGUF, downloaded once into a cache named by its recorded sha256 and checked against it
    (and `base_gguf` against its record) on every use, once: a file altered in the artifact store or in
    the cache is refused, and nothing unverified is cached."""
    import mlflow

    cache = settings.home / "cache" / "served"
    target = cache / f"{expected[FORMS[served_form(expected)][1]]}.gguf"
    if target.is_file():
        check_served(target, expected, base_gguf, what)
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="download-", dir=cache))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
        check_served(local, expected, base_gguf, what)
        local.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def verify_upload(model_id: str, tags: dict[str, str], settings: Settings) -> None:
    """After logging: the served GGUF downloads back with its recorded hash (else no version)."""
    form = served_form(tags) or FORM_MERGED
    uri = served_uri(model_id, form)
    if uri is None:
        raise ServedArtifactMismatch(f"logged model {model_id} has no {FORMS[form][0]} artifact")
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
    info: version, run_id, engine, served_form, artifact_sha256, base_model, max_new_tokens,
    repetition_penalty, load_s."""
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
    kind, form, gguf, sha = version.tags.get(TAG_ENGINE), served_form(version.tags), None, None
    if kind == "llama.cpp":
        if form not in FORMS:
            raise ServedArtifactMismatch(f"{what} is tagged for llama.cpp with unknown served form {form!r}")
        uri = served_uri(version.source.removeprefix("models:/"), form)
        if uri is None:
            raise ServedArtifactMismatch(f"{what} is tagged for llama.cpp but has no {FORMS[form][0]} artifact")
        gguf = fetch_served(uri, version.tags, settings, what, shipped_gguf(base_model))
        sha = version.tags[FORMS[form][1]]
    elif kind is None:
        log.warning("%s predates served artifacts: opening it with the engine evaluation would pick", what)
    engine = open_engine(base_model, adapter_dir, settings, dtype=cfg.get("dtype", "float32"),
                         repetition_penalty=penalty, engine=kind or "auto", label=f"v{version.version}",
                         served_gguf=gguf, served_form=form or FORM_MERGED)
    info = {"version": int(version.version), "run_id": version.run_id, "engine": engine.name,
            "served_form": getattr(engine, "form", None),
            "artifact_sha256": sha or version.tags.get("adapter_digest"), "base_model": base_model,
            "max_new_tokens": int(cfg.get("max_new_tokens", 160)), "repetition_penalty": penalty,
            "load_s": round(time.perf_counter() - t0, 2)}
    log.info("opened %s (%s) in %.1f s", what, engine.name, info["load_s"])
    return engine, info
