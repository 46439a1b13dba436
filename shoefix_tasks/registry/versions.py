"""The MLflow model registry for `shoefix-expert`: versions, aliases, history, rollback.

- One version per training run (idempotent: a retry finds the version by its run id; two racing
  creators converge on the lowest version and delete their own extra).
- A version is created only after its uploaded adapter was downloaded back and matched its
  manifest: a failed or partial upload never becomes a version.
- `challenger` = the latest evaluated version; `champion` = the one serving. Every champion move
  (promotion, rollback) runs under the ledger's promotion lease, so two runs never interleave
  read-champion / compare / set-alias.
- MLflow keeps no alias history, so every champion change is appended to the ledger's
  `champion_history` table *after* the alias was set and read back.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from shoefix_tasks.config import REGISTERED_MODEL, Settings
from shoefix_tasks.errors import PermanentError
from shoefix_tasks.store import ledger
from shoefix_tasks.store.lease import Lease

log = logging.getLogger(__name__)
CHAMPION, CHALLENGER = "champion", "challenger"
PROMOTION_LEASE = f"promotion:{REGISTERED_MODEL}"


def promotion_lock(settings: Settings, holder: str) -> Lease:
    """The lease serializing champion changes across processes and hosts (use as `with`).

    SHOEFIX_PROMOTION_LEASE_S (default 60): how long a crashed holder blocks the others;
    SHOEFIX_PROMOTION_WAIT_S (default 1500, inside the gate task's 30-minute timeout): how long
    to wait for a live holder before failing (the task then retries).
    """
    return Lease(ledger.engine_for(settings.ledger_url), PROMOTION_LEASE,
                        f"{holder}@{socket.gethostname()}:{os.getpid()}",
                        ttl_s=float(os.environ.get("SHOEFIX_PROMOTION_LEASE_S", 60)),
                        wait_s=float(os.environ.get("SHOEFIX_PROMOTION_WAIT_S", 1500)))


def _client():
    import mlflow

    return mlflow.MlflowClient()


def ensure_registered_model(client) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(REGISTERED_MODEL)
    except MlflowException:
        try:
            client.create_registered_model(
                REGISTERED_MODEL, description="Shoe mold-prevention expert: LoRA adapters over a base model. "
                "Alias `champion` serves; `challenger` is the latest evaluated version.")
        except MlflowException:  # created concurrently
            client.get_registered_model(REGISTERED_MODEL)


def version_by_alias(alias: str):
    """The ModelVersion holding `alias`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return _client().get_model_version_by_alias(REGISTERED_MODEL, alias)
    except MlflowException:
        return None


def version_for_run(training_run_id: str):
    found = _client().search_model_versions(f"name='{REGISTERED_MODEL}' and run_id='{training_run_id}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def _model_adapter_uri(model_id: str) -> str:
    """The adapter folder inside a logged pyfunc model, as its MLmodel file names it."""
    import mlflow
    import yaml

    root = _client().get_logged_model(model_id).artifact_location
    with tempfile.TemporaryDirectory() as tmp:
        mlmodel = mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/MLmodel", dst_path=tmp)
        artifacts = yaml.safe_load(Path(mlmodel).read_text())["flavors"]["python_function"]["artifacts"]
    return f"{root}/{artifacts['adapter']['path']}"


def adapter_uri(version) -> str:
    """Where a version's adapter lives: inside the logged model the version points at."""
    source = version.source or ""
    if source.startswith("models:/m-"):
        return _model_adapter_uri(source.removeprefix("models:/"))
    return f"runs:/{version.run_id}/adapter"  # versions registered from a run's artifacts


def _fetch_verified(uri: str, target: Path) -> dict[str, Any]:
    """Download `uri` (an adapter folder) into `target` atomically and verify it against its manifest."""
    import mlflow

    from shoefix_tasks.model.adapter import verify_adapter

    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".partial-", dir=target.parent))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
        manifest = verify_adapter(local)
        shutil.rmtree(target, ignore_errors=True)
        local.rename(target)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download_adapter(version, settings: Settings) -> Path:
    """The version's adapter folder, fetched into a cache keyed by its content digest (tag
    `adapter_digest`, recorded at registration) and verified on every use. A version number can be
    reused (a registry rebuilt, a model deleted and registered again); content cannot, so a cached
    adapter is never served for the wrong version. A downloaded adapter whose digest differs from the
    version's recorded one is refused."""
    from shoefix_tasks.model.adapter import MANIFEST, AdapterIntegrityError, adapter_digest, verify_adapter

    cache = settings.home / "cache" / "adapters"
    recorded = version.tags.get("adapter_digest")
    if recorded and (cache / recorded / MANIFEST).is_file():
        target = cache / recorded
    else:
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"v{version.version}-", dir=cache)) / "adapter"
        try:
            digest = adapter_digest(_fetch_verified(adapter_uri(version), staging))
            if recorded and digest != recorded:
                raise AdapterIntegrityError(f"version {version.version}: downloaded adapter {digest[:12]} is not the "
                                            f"registered one {recorded[:12]}")
            target = cache / digest
            if not (target / MANIFEST).is_file():
                shutil.rmtree(target, ignore_errors=True)
                staging.rename(target)
        finally:
            shutil.rmtree(staging.parent, ignore_errors=True)
    manifest = verify_adapter(target)
    if recorded and adapter_digest(manifest) != recorded:
        raise AdapterIntegrityError(f"cached adapter {target} does not match version {version.version}'s digest")
    return target


def _log_verified_model(adapter_dir: Path, base_model: str, decoding: dict[str, Any] | None, settings: Settings):
    """Log the pyfunc model (from code), then download its adapter back and check it against the
    local manifest: the upload is complete and intact, or this raises and no version is created."""
    import mlflow

    from shoefix_tasks.model.adapter import AdapterIntegrityError, verify_adapter
    from shoefix_tasks.registry import served, serving

    local = verify_adapter(adapter_dir)
    settings.home.mkdir(parents=True, exist_ok=True)
    # the signature declares `max_new_tokens` as an inference-time param (else MLflow drops it)
    signature = mlflow.models.infer_signature(
        ["How do I keep boots dry?"], ["Dry them within 24–48 hours."],
        params={"max_new_tokens": int((decoding or {}).get("max_new_tokens", 160))})
    with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="served-", dir=settings.home) as work:
        # the served GGUF for llama.cpp (registry/served.py), logged beside the adapter
        extra, served_tags = served.derive_served(adapter_dir, base_model, Path(work))
        # an input example would make MLflow load the model and generate at registration; the
        # signature above already says what goes in and out
        warnings.filterwarnings("ignore", message=r".*An input example was not provided", category=UserWarning)
        info = mlflow.pyfunc.log_model(
            signature=signature,
            name="model", python_model=serving.__file__, artifacts={"adapter": str(adapter_dir), **extra},
            model_config={"base_model": base_model, **(decoding or {}), **served_tags},
            pip_requirements=["shoefix", "mlflow", "transformers", "peft", "torch", "safetensors",
                              "llama-cpp-python"],
        )
    check = settings.home / "cache" / "uploads" / info.model_id
    check.parent.mkdir(parents=True, exist_ok=True)
    uploaded = _fetch_verified(_model_adapter_uri(info.model_id), check)
    shutil.rmtree(check, ignore_errors=True)
    if uploaded["files"] != local["files"]:
        raise AdapterIntegrityError(f"uploaded adapter of {info.model_id} differs from the local one")
    if extra:
        served.verify_upload(info.model_id, served_tags, settings)
    return info, served_tags


def register_version(training_run_id: str, adapter_dir: Path, base_model: str, tags: dict[str, str],
                     description: str, decoding: dict[str, Any] | None = None,
                     settings: Settings | None = None) -> Any:
    """Log the pyfunc model (from code) into the training run and register it, once per run. The
    adapter's served form (registry/served.py) is logged beside it; its hashes become version tags."""
    import mlflow

    settings = settings or Settings.from_env()
    client = _client()
    ensure_registered_model(client)
    existing = version_for_run(training_run_id)
    if existing is not None:
        log.info("training run %s already registered as version %s (retry)", training_run_id, existing.version)
        version = existing
    else:
        with mlflow.start_run(run_id=training_run_id):
            info, served_tags = _log_verified_model(adapter_dir, base_model, decoding, settings)
        created = client.create_model_version(REGISTERED_MODEL, source=info.model_uri, run_id=training_run_id,
                                              tags={"training_run": training_run_id}, model_id=info.model_id)
        version = version_for_run(training_run_id)
        if int(version.version) != int(created.version):
            # another attempt for the same run registered first: keep the lowest version, drop ours
            log.warning("run %s was registered concurrently as v%s; deleting duplicate v%s",
                        training_run_id, version.version, created.version)
            client.delete_model_version(REGISTERED_MODEL, created.version)
    if existing is not None:  # a retry: the version holds whatever an earlier attempt uploaded
        from shoefix_tasks.model.adapter import AdapterIntegrityError, adapter_digest, verify_adapter

        registered = adapter_digest(verify_adapter(download_adapter(existing, settings)))
        if registered != adapter_digest(verify_adapter(adapter_dir)):
            raise AdapterIntegrityError(f"version {existing.version} holds adapter {registered[:12]}, not the one "
                                        "being registered")
        from shoefix_tasks.registry.served import recorded_tags

        # as logged: deriving again could give other bytes if the code changed between the attempts
        served_tags = recorded_tags(version.source.removeprefix("models:/")) \
            if (version.source or "").startswith("models:/m-") else {}
    for k, v in {**tags, **served_tags}.items():
        client.set_model_version_tag(REGISTERED_MODEL, version.version, k, str(v))
    client.update_model_version(REGISTERED_MODEL, version.version, description=description)
    return client.get_model_version(REGISTERED_MODEL, version.version)


# rows that moved the alias (a held-back review records the candidate, which never held it)
_HOLDS_ALIAS = ledger.champion_history.c.action.notin_(("review-rejected", "review-timeout", "review-stale"))


def _last_event(settings: Settings) -> dict[str, Any] | None:
    engine = ledger.engine_for(settings.ledger_url)
    with engine.connect() as conn:
        row = conn.execute(sa.select(ledger.champion_history)
                           .where(ledger.champion_history.c.model_name == REGISTERED_MODEL, _HOLDS_ALIAS)
                           .order_by(ledger.champion_history.c.event_id.desc()).limit(1)).mappings().first()
    return dict(row) if row else None


def _record_history(settings: Settings, version: int, previous: int | None, action: str, reason: str,
                    actor: str) -> None:
    engine = ledger.engine_for(settings.ledger_url)
    with engine.begin() as conn:
        last = conn.execute(sa.select(ledger.champion_history.c.version)
                            .where(ledger.champion_history.c.model_name == REGISTERED_MODEL, _HOLDS_ALIAS)
                            .order_by(ledger.champion_history.c.event_id.desc()).limit(1)).scalar()
        if last == version:  # retry after the alias was already recorded: complete, don't duplicate
            return
        conn.execute(sa.insert(ledger.champion_history), [{
            "model_name": REGISTERED_MODEL, "version": version, "previous_version": previous,
            "action": action, "reason": reason, "actor": actor, "at": ledger.utcnow()}])


def set_champion(settings: Settings, version: int, reason: str, actor: str, action: str = "promote",
                 lease: Lease | None = None) -> int | None:
    """Move `champion` to `version`, read it back, then record it. Returns the previous champion.

    Call it under the promotion lease (pass it: it is checked right before the alias moves). A retry
    that finds the alias already on `version` only completes the history record, with the real
    previous champion (the last one recorded), not `version` itself.
    """
    client = _client()
    current = version_by_alias(CHAMPION)
    previous = int(current.version) if current is not None else None
    if previous == version:
        last = _last_event(settings)
        if last is not None:
            previous = last["previous_version"] if last["version"] == version else last["version"]
        else:
            previous = None
    else:
        if lease is not None:
            lease.check()
        client.set_registered_model_alias(REGISTERED_MODEL, CHAMPION, str(version))
    check = version_by_alias(CHAMPION)
    if check is None or int(check.version) != version:
        raise RuntimeError(f"alias {CHAMPION} did not read back as version {version}")
    client.set_model_version_tag(REGISTERED_MODEL, str(version), "champion_since", ledger.utcnow().isoformat())
    _record_history(settings, version, previous, action, reason, actor)
    return previous


def set_challenger(version: int) -> None:
    _client().set_registered_model_alias(REGISTERED_MODEL, CHALLENGER, str(version))


def champion_history(settings: Settings, newest_first: bool = False, limit: int | None = None) -> list[dict[str, Any]]:
    """Every champion change (promotion, rollback, forced rollback) with its reason and actor."""
    t = ledger.champion_history
    order = t.c.event_id.desc() if newest_first else t.c.event_id
    q = sa.select(t).where(t.c.model_name == REGISTERED_MODEL).order_by(order)
    with ledger.engine_for(settings.ledger_url).connect() as conn:
        rows = conn.execute(q.limit(limit) if limit else q).mappings().all()
    return [dict(r) for r in rows]


class RollbackRefused(PermanentError, ValueError):
    """A rollback the registry will not do as asked (no reason; a target the gate refused, unforced)."""


def rollback(settings: Settings, to_version: int, reason: str, actor: str, force: bool = False) -> dict[str, Any]:
    """Make an earlier version champion again. It must exist and have an intact adapter.

    A version the gate did not promote (tag `gate_decision` is `keep_champion`, `rejected`, or
    missing) never served for a reason: rolling back onto it is refused unless `force`, and a
    forced rollback is recorded as action `rollback-forced` with its reason, so the history shows
    that a person overrode the gate and why.
    """
    if len("".join(reason.split())) < 5:
        raise RollbackRefused("a rollback needs a reason (at least 5 non-whitespace characters)")
    client = _client()
    target = client.get_model_version(REGISTERED_MODEL, str(to_version))
    decision = target.tags.get("gate_decision")
    review = target.tags.get("review", "approved")  # absent: promoted without a review (mode auto)
    if decision != "promote" and not force:
        raise RollbackRefused(f"version {to_version} was not promoted by the gate (gate_decision: {decision or 'none'}); "
                              "rolling back onto it needs force (shoefix rollback --force, DAG param force=true)")
    if review != "approved" and not force:
        raise RollbackRefused(f"version {to_version} passed the gate but its review did not approve it (review: "
                              f"{review}); rolling back onto it needs force")
    forced = decision != "promote" or review != "approved"
    download_adapter(target, settings)  # refuse to roll back onto a tampered or missing adapter
    action = "rollback-forced" if forced else "rollback"
    with promotion_lock(settings, f"rollback:{actor}") as lease:
        previous = set_champion(settings, int(to_version), reason, actor, action=action, lease=lease)
    log.info("%s champion from %s to %s: %s", action, previous, to_version, reason)
    return {"champion": int(to_version), "previous": previous, "reason": reason, "forced": forced}
