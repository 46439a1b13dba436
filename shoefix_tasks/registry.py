"""The MLflow model registry for `shoefix-expert`: versions, aliases, history, rollback.

- One version per training run (idempotent: a retry finds the version by its run id).
- `challenger` = the latest evaluated version; `champion` = the one serving.
- MLflow keeps no alias history, so every champion change is appended to the ledger's
  `champion_history` table *after* the alias was set and read back.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from shoefix_tasks import ledger
from shoefix_tasks.config import REGISTERED_MODEL, Settings

log = logging.getLogger(__name__)
CHAMPION, CHALLENGER = "champion", "challenger"


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


def download_adapter(version, settings: Settings) -> Path:
    """The version's adapter folder, fetched once into the local cache and verified."""
    from shoefix_tasks.adapter import verify_adapter

    target = settings.home / "cache" / "adapters" / f"v{version.version}"
    if not (target / "shoefix_manifest.json").is_file():
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _client().download_artifacts(version.run_id, "adapter", str(tmp))
        shutil.rmtree(target, ignore_errors=True)
        (tmp / "adapter").rename(target)
        shutil.rmtree(tmp, ignore_errors=True)
    verify_adapter(target)
    return target


def register_version(training_run_id: str, adapter_dir: Path, base_model: str, tags: dict[str, str],
                     description: str, decoding: dict[str, Any] | None = None) -> Any:
    """Log the pyfunc model (from code) into the training run and register it, once per run."""
    import mlflow

    from shoefix_tasks import serving

    client = _client()
    ensure_registered_model(client)
    existing = version_for_run(training_run_id)
    if existing is not None:
        log.info("training run %s already registered as version %s (retry)", training_run_id, existing.version)
        version = existing
    else:
        # the signature declares `max_new_tokens` as an inference-time param (else MLflow drops it)
        signature = mlflow.models.infer_signature(
            ["How do I keep boots dry?"], ["Dry them within 24–48 hours."],
            params={"max_new_tokens": int((decoding or {}).get("max_new_tokens", 160))})
        with mlflow.start_run(run_id=training_run_id):
            info = mlflow.pyfunc.log_model(
                signature=signature,
                name="model", python_model=serving.__file__, artifacts={"adapter": str(adapter_dir)},
                model_config={"base_model": base_model, **(decoding or {})},
                pip_requirements=["shoefix", "mlflow", "transformers", "peft", "torch", "safetensors"],
            )
        version = client.create_model_version(REGISTERED_MODEL, source=info.model_uri, run_id=training_run_id,
                                              tags={"training_run": training_run_id})
    for k, v in tags.items():
        client.set_model_version_tag(REGISTERED_MODEL, version.version, k, str(v))
    client.update_model_version(REGISTERED_MODEL, version.version, description=description)
    return client.get_model_version(REGISTERED_MODEL, version.version)


def _record_history(settings: Settings, version: int, previous: int | None, action: str, reason: str,
                    actor: str) -> None:
    engine = ledger.engine_for(settings.ledger_url)
    with engine.begin() as conn:
        last = conn.execute(sa.select(ledger.champion_history.c.version)
                            .where(ledger.champion_history.c.model_name == REGISTERED_MODEL)
                            .order_by(ledger.champion_history.c.event_id.desc()).limit(1)).scalar()
        if last == version:  # retry after the alias was already recorded: complete, don't duplicate
            return
        conn.execute(sa.insert(ledger.champion_history), [{
            "model_name": REGISTERED_MODEL, "version": version, "previous_version": previous,
            "action": action, "reason": reason, "actor": actor, "at": ledger.utcnow()}])


def set_champion(settings: Settings, version: int, reason: str, actor: str, action: str = "promote") -> int | None:
    """Move `champion` to `version`, read it back, then record it. Returns the previous champion."""
    client = _client()
    current = version_by_alias(CHAMPION)
    previous = int(current.version) if current is not None else None
    if previous != version:
        client.set_registered_model_alias(REGISTERED_MODEL, CHAMPION, str(version))
    check = version_by_alias(CHAMPION)
    if check is None or int(check.version) != version:
        raise RuntimeError(f"alias {CHAMPION} did not read back as version {version}")
    client.set_model_version_tag(REGISTERED_MODEL, str(version), "champion_since", ledger.utcnow().isoformat())
    _record_history(settings, version, previous, action, reason, actor)
    return previous


def set_challenger(version: int) -> None:
    _client().set_registered_model_alias(REGISTERED_MODEL, CHALLENGER, str(version))


def champion_history(settings: Settings) -> list[dict[str, Any]]:
    engine = ledger.engine_for(settings.ledger_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(ledger.champion_history)
                            .where(ledger.champion_history.c.model_name == REGISTERED_MODEL)
                            .order_by(ledger.champion_history.c.event_id)).mappings().all()
    return [dict(r) for r in rows]


def rollback(settings: Settings, to_version: int, reason: str, actor: str) -> dict[str, Any]:
    """Make an earlier version champion again. It must exist and have an intact adapter."""
    if not reason.strip():
        raise ValueError("a rollback needs a reason")
    client = _client()
    target = client.get_model_version(REGISTERED_MODEL, str(to_version))
    download_adapter(target, settings)  # refuse to roll back onto a tampered or missing adapter
    previous = set_champion(settings, int(to_version), reason, actor, action="rollback")
    log.info("rolled back champion from %s to %s: %s", previous, to_version, reason)
    return {"champion": int(to_version), "previous": previous, "reason": reason}
