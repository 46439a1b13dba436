"""Announce new expert Q&A in the inbox as an Asset event (optional data-aware scheduling).

- Trigger: every 10 minutes when SHOEFIX_ASSET_TRIGGER=on; otherwise manual only (the default).
- Inputs: the inbox ($SHOEFIX_INBOX), the ledger's processed files, and the last event of
  Asset `shoefix://inbox/new` (what was already announced).
- Outputs: an event on `shoefix://inbox/new` with extra {files, bytes, names, digest} when the set
  of unprocessed files changed since the last announcement; no event otherwise. With the setting on,
  `shoefix_weekly_retrain` is scheduled on this asset as well as on its cron.
- Side effects: none; no file is read or moved (collection stays `collect_qa`'s job).
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta

import pendulum
from airflow.sdk import AssetAlias, dag, get_current_context, task
from retrain_graph import DEFAULT_ARGS, INBOX_NEW, TIMEZONE, asset_trigger_enabled

INBOX_ALIAS = AssetAlias("shoefix_inbox_new")


@task(outlets=[INBOX_ALIAS], inlets=[INBOX_NEW], execution_timeout=timedelta(minutes=5))
def announce_new_files() -> dict:
    from shoefix_tasks.config import Settings
    from shoefix_tasks.intake.inbox import pending_inbox_files

    ctx = get_current_context()
    files = pending_inbox_files(Settings.from_env())
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    last = list(ctx["inlet_events"][INBOX_NEW].ascending(False).limit(1))
    announce = bool(files) and (not last or (last[0].extra or {}).get("digest") != digest)
    if announce:
        ctx["outlet_events"][INBOX_ALIAS].add(INBOX_NEW, extra={
            "files": len(files), "bytes": sum(f["size"] for f in files),
            "names": [f["name"] for f in files[:20]], "digest": digest})
    return {"pending": len(files), "announced": announce}


@dag(
    dag_id="shoefix_inbox_watch",
    schedule="*/10 * * * *" if asset_trigger_enabled() else None,
    start_date=pendulum.datetime(2026, 1, 1, tz=TIMEZONE),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["shoefix", "assets"],
    doc_md=__doc__,
)
def shoefix_inbox_watch():
    announce_new_files()


shoefix_inbox_watch()
