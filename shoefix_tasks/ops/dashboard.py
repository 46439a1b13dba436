"""Read-only views of the installation for the ShoeFix page in Airflow (and anything else that shows it).

Everything here only reads: the registry (champion, its scorecard, the challenger that never served),
the ledger (champion history, recent batches and their quarantine, deferred inbox files). Values are returned raw; escaping is
the renderer's job. Nothing here loads a model: answers come from `shoefix serve` (ops/client.py).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import sqlalchemy as sa

from shoefix_tasks.config import REGISTERED_MODEL, Settings
from shoefix_tasks.store import ledger

log = logging.getLogger(__name__)
SCORECARD_TAGS = ("gate_decision", "challenged", "composite", "recipe", "recipe_sha256", "base_model",
                  "corpus_snapshot", "holdout_hash", "training_run", "evaluation_run", "pipeline_run",
                  "trigger_reason", "triggered_by")
REVIEW_TAGS = ("review", "reviewed_by", "review_comment")


def _mlflow(settings: Settings):
    # Only point MLflow at the store: unlike tracking.configure, never create an experiment from a page view.
    import mlflow

    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    return mlflow


def champion(settings: Settings) -> dict[str, Any] | None:
    """The serving version: number, tags, since when, why and by whom it became champion."""
    mlflow = _mlflow(settings)
    from mlflow.exceptions import MlflowException

    from shoefix_tasks.store import tracking

    try:
        v = mlflow.MlflowClient().get_model_version_by_alias(REGISTERED_MODEL, "champion")
    except MlflowException:
        return None
    events = [h for h in history(settings) if h["version"] == int(v.version)]
    latest = events[0] if events else {}
    return {"version": int(v.version), "run_id": v.run_id, "tags": {k: v.tags.get(k) for k in SCORECARD_TAGS},
            "gate_reasons": tracking.json_tag(v.tags, "gate_reasons", []),
            "since": latest.get("at") or v.tags.get("champion_since"), "reason": latest.get("reason"),
            "actor": latest.get("actor"), "action": latest.get("action")}


def latest_challenger(settings: Settings, champion_version: int | None) -> dict[str, Any] | None:
    """The version holding alias `challenger` (the latest evaluated, set by registry/promotion.py) when
    it never served: the last challenger kept out, with why (the gate's decision and reasons, a pending
    or refused review, the forbidden claims it stated). Without it a run that kept the champion (or the
    base) would leave the page unchanged, and nobody could see why. A version that served once and was
    rolled back from is history, not a challenger. (A challenger refused in evaluation, before
    registration, has no version to show.)"""
    from shoefix_tasks.registry import versions as registry
    from shoefix_tasks.registry.review import NOT_PROMOTED_ACTIONS
    from shoefix_tasks.store import tracking

    _mlflow(settings)
    v = registry.version_by_alias(registry.CHALLENGER)
    if v is None or int(v.version) == champion_version:
        return None
    if any(h["version"] == int(v.version) and h["action"] not in NOT_PROMOTED_ACTIONS
           for h in history(settings, limit=None)):
        return None
    return {"version": int(v.version), "tags": {k: v.tags.get(k) for k in (*SCORECARD_TAGS, *REVIEW_TAGS)},
            "gate_reasons": tracking.json_tag(v.tags, "gate_reasons", []),
            "forbidden_claims": tracking.json_tag(v.tags, "forbidden_claims", {})}


_scorecards: dict[str, dict[str, Any] | None] = {}


def scorecard(settings: Settings, evaluation_run: str | None) -> dict[str, Any] | None:
    """The evaluation that admitted a version: `evaluation.json` of its evaluation run (cached:
    an evaluation run's artifacts never change). Rows as `report.scorecard_rows` gives them."""
    if not evaluation_run:
        return None
    if evaluation_run not in _scorecards:
        mlflow = _mlflow(settings)
        from shoefix_tasks.evaluation.report import scorecard_rows

        try:
            data = json.loads(mlflow.artifacts.load_text(f"runs:/{evaluation_run}/evaluation.json"))
        except Exception as err:  # missing or unreadable artifact: show the page without it
            log.warning("no evaluation.json for run %s: %s", evaluation_run, err)
            return None
        _scorecards[evaluation_run] = {
            "champion_label": data["champion"]["label"], "rows": scorecard_rows(data),
            "questions": sum(1 for s in data["challenger"]["scores"] if not s["guard"]),
            "guard": len(data.get("guard_ids", [])), "holdout_hash": data.get("holdout_hash", "")}
    return _scorecards[evaluation_run]


def history(settings: Settings, limit: int | None = 50) -> list[dict[str, Any]]:
    """Champion changes, newest first (the registry's record of them)."""
    from shoefix_tasks.registry.versions import champion_history

    return champion_history(settings, newest_first=True, limit=limit)


def recent_batches(settings: Settings, limit: int = 8, samples: int = 5) -> list[dict[str, Any]]:
    """The last batches, newest first: record counts by status, quarantine reasons and a few quarantined rows."""
    engine = ledger.engine_for(settings.ledger_url)
    b, r = ledger.batches, ledger.records
    with engine.connect() as conn:
        rows = conn.execute(sa.select(b).order_by(b.c.created_at.desc()).limit(limit)).mappings().all()
        out = []
        for row in rows:
            sample = conn.execute(
                sa.select(r.c.record_id, r.c.source, r.c.line_no, r.c.check_name, r.c.reason)
                .where(r.c.batch_id == row["batch_id"], r.c.status == "quarantined")
                .order_by(r.c.row_id).limit(samples)).mappings().all()
            # by full check name (with its column), more telling on a page than ledger.quarantine_reasons
            reasons = conn.execute(
                sa.select(r.c.check_name, sa.func.count())
                .where(r.c.batch_id == row["batch_id"], r.c.status == "quarantined")
                .group_by(r.c.check_name)).all()
            out.append({"batch_id": row["batch_id"], "created_at": row["created_at"], "status": row["status"],
                        "counts": ledger.status_counts(engine, row["batch_id"]),
                        "reasons": {name or "unknown": n for name, n in reasons},
                        "samples": [dict(s) for s in sample]})
    return out


def deferred_files(settings: Settings, limit: int = 50) -> list[dict[str, Any]]:
    """Inbox files waiting for their writer (cut-off last record), oldest first: name, size, when
    first seen, age (since last written: the grace clock of intake/deferral.py), the grace, and
    how long until a run reads them anyway (0: the next run). The grace is this process's
    SHOEFIX_TRUNCATED_GRACE_S: set it for the api-server as for the workers."""
    from shoefix_tasks.intake import deferral

    try:
        grace = deferral.grace_s()
    except ValueError as err:  # the collector refuses to run with it; the page still shows the files
        log.warning("%s; the page assumes the default", err)
        grace = deferral.DEFAULT_GRACE_S
    f = ledger.inbox_files
    with ledger.engine_for(settings.ledger_url).connect() as conn:
        rows = conn.execute(sa.select(f.c.name, f.c.size, f.c.seen_at, f.c.modified_at, f.c.batch_id)
                            .where(f.c.status == "deferred").order_by(f.c.seen_at, f.c.name).limit(limit)).mappings().all()
    now = ledger.utcnow()
    out = []
    for r in rows:
        age = deferral.age_s(now, r["modified_at"], r["seen_at"])
        out.append({"name": r["name"], "size": r["size"], "first_seen": deferral.aware(r["seen_at"]),
                    "modified_at": deferral.aware(r["modified_at"]), "batch_id": r["batch_id"], "age_s": age,
                    "age": deferral.human(age), "grace_s": grace, "grace": deferral.human(grace),
                    "due_in_s": max(0.0, grace - age), "due_in": deferral.human(max(0.0, grace - age))})
    return out


def asked_not_covered(settings: Settings, top: int = 30) -> dict[str, Any]:
    """The most-asked served questions with no close corpus question, by topic (intake.asked), and how many
    answers the log holds: what experts should write next."""
    from shoefix_tasks.intake.asked import by_topic
    from shoefix_tasks.registry import answer_log

    answers, rows = answer_log.uncovered_questions(settings, top)
    return {"answers": answers, "uncovered": rows, "by_topic": by_topic(rows),
            "log": answer_log.stats(settings)}


def recent_answers(settings: Settings, limit: int = 10) -> list[dict[str, Any]]:
    """The last served answers, newest first, each with whether a reviewer has corrected it."""
    from shoefix_tasks.registry import answer_log, feedback

    corrected = {r["provenance"]["answer_id"] for r in feedback.list_feedback(settings) if r.get("provenance")}
    latest: dict[str, dict[str, Any]] = {}
    for a in answer_log.iter_answers(settings):  # sent (index) before waiting: the sent line wins
        latest.setdefault(a["answer_id"], a)
    rows = sorted(latest.values(), key=lambda a: -a["at"])[:limit]
    return [{**a, "corrected": a["answer_id"] in corrected} for a in rows]
