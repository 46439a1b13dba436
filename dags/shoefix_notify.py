"""Notifications on failure and on a champion change, through Airflow's Slack and SMTP notifiers.

Configured by connection, silent when none exists (logged, nothing fails):
- `shoefix_slack`: a Slack Incoming Webhook (conn type `slackwebhook`, webhook URL or token in the
  password) -> `SlackWebhookNotifier`;
- `shoefix_smtp`: an SMTP server (conn type `smtp`) whose extra names the recipients,
  `{"to": "ops@example.com", "from_email": "shoefix@example.com"}` -> `SmtpNotifier`.
Both may be set; each is tried on its own, and a channel that fails is logged, never raised: a
notification never changes a task's outcome.

Messages hold identifiers and decisions only (DAG, task, run, version, gate reasons, the
exception's type and the task log's URL), never exception text or connection fields, which can
quote credentials. They are also never rendered as Jinja templates (record or reason text could
otherwise read connections and variables), which is why the provider notifiers' `notify` is called
directly. Provider imports happen when a message is sent, not when a DAG file is parsed.
"""

from __future__ import annotations

import logging
from html import escape
from typing import Any

from airflow.sdk.bases.notifier import BaseNotifier

log = logging.getLogger(__name__)
SLACK_CONN_ID = "shoefix_slack"
SMTP_CONN_ID = "shoefix_smtp"


def _connection(conn_id: str):
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return None


def _slack(_conn, subject: str, text: str):
    from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

    return SlackWebhookNotifier(slack_webhook_conn_id=SLACK_CONN_ID, text=f"*{subject}*\n{text}")


def _smtp(conn, subject: str, text: str):
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    extra = conn.extra_dejson
    if not extra.get("to"):
        raise ValueError(f"connection {SMTP_CONN_ID} has no recipients: set extra.to")
    return SmtpNotifier(to=extra["to"], from_email=extra.get("from_email") or "shoefix@localhost", subject=subject,
                        html_content=f"<pre>{escape(text)}</pre>", smtp_conn_id=SMTP_CONN_ID)


CHANNELS = ((SLACK_CONN_ID, _slack), (SMTP_CONN_ID, _smtp))


def send(subject: str, text: str, context: dict[str, Any]) -> list[str]:
    """Send through every configured channel; returns the connection ids that delivered."""
    delivered = []
    for conn_id, build in CHANNELS:
        conn = _connection(conn_id)
        if conn is None:
            continue
        try:
            build(conn, subject, text).notify(context)
            delivered.append(conn_id)
        except Exception as err:  # the type only: provider errors can quote the webhook URL
            log.error("ShoeFix notification through %s failed: %s", conn_id, type(err).__name__)
    if not delivered:
        log.info("ShoeFix notification not sent (no %s or %s connection delivered it): %s",
                 SLACK_CONN_ID, SMTP_CONN_ID, subject)
    return delivered


def failure_message(context: dict[str, Any]) -> tuple[str, str]:
    ti = context["ti"]
    err = context.get("exception")
    subject = f"ShoeFix: {ti.dag_id}.{ti.task_id} failed"
    text = (f"Task {ti.task_id} of DAG {ti.dag_id} failed after {ti.try_number} tries in run {ti.run_id}"
            f"{f' ({type(err).__name__})' if err is not None else ''}.\nLog: {getattr(ti, 'log_url', '')}")
    return subject, text


def champion_message(context: dict[str, Any]) -> tuple[str, str] | None:
    """From the task's return value: `gate_and_promote` (decision == promote, unless held for review),
    `apply_review` (approved) or a rollback."""
    ti = context["ti"]
    ret = ti.xcom_pull(task_ids=ti.task_id) or {}
    model = ret.get("model", "shoefix-expert")
    if ret.get("decision") == "promote" and ret.get("review") == "pending":
        return None  # the champion has not moved: the approval task asks a person first
    if ret.get("decision") == "promote":
        reasons = "\n".join(f"- {r}" for r in ret.get("reasons", []))
        asked = (f"\nTriggered by {ret.get('triggered_by') or 'an unnamed user'} because: {ret['trigger_reason']}"
                 if ret.get("trigger_reason") else "")
        return (f"ShoeFix: {model} v{ret['version']} is the new champion",
                f"v{ret['version']} was promoted by {ti.dag_id} (run {ti.run_id}).{asked}\nGate:\n{reasons}")
    if "previous" in ret and "champion" in ret:
        forced = " FORCED onto a version the gate did not promote" if ret.get("forced") else ""
        return (f"ShoeFix: {model} rolled back to v{ret['champion']}{' (forced)' if forced else ''}",
                f"Champion v{ret['previous']} -> v{ret['champion']} by {ti.dag_id} (run {ti.run_id}){forced}.\n"
                f"Reason: {ret.get('reason', '')}")
    return None  # evaluated but kept the champion: nothing to announce


def use_message(context: dict[str, Any]) -> tuple[str, str] | None:
    """From `summarize_use`'s return value: the week's served answers, corrections, and the most-asked
    questions the corpus does not cover (question text is what users typed, PII removed at serving;
    like record text it is sent as plain text, never rendered as a template)."""
    ti = context["ti"]
    ret = ti.xcom_pull(task_ids=ti.task_id) or {}
    if not ret.get("answers") and not ret.get("corrections"):
        return None  # nothing served yet: nothing to report
    lines = [f"{ret['answers']} answers logged ({ret.get('traces_waiting', 0)} waiting for MLflow, "
             f"{ret.get('traces_dropped', 0)} dropped); {ret.get('corrections', 0)} expert corrections in the inbox."]
    uncovered = ret.get("uncovered") or {}
    if uncovered:
        lines.append("Asked most, with no close corpus question (what experts could write next):")
        for topic, rows in uncovered.items():
            lines += [f"- [{topic}] {r['question']} (x{r['asked']})" for r in rows]
    return f"ShoeFix: what users asked ({ti.dag_id}, run {ti.run_id})", "\n".join(lines)


def late_message(context: dict[str, Any], late_after_hours: float) -> tuple[str, str]:
    """From a deadline callback's context (`dag_run`: the run as the REST API shows it, `deadline`)."""
    run = context.get("dag_run") or {}
    dag_id, run_id = run.get("dag_id", "?"), run.get("dag_run_id") or run.get("run_id", "?")
    return (f"ShoeFix: {dag_id} run {run_id} is late",
            f"Run {run_id} of {dag_id} (queued {run.get('queued_at') or '?'}, state {run.get('state') or '?'}) is still "
            f"going {late_after_hours:g} h after it was queued (policy alerts.late_after_hours). A stuck worker, "
            "a starved GPU pool or an approval nobody answered? See the run in Airflow.")


def notify_late_run(context: dict[str, Any], late_after_hours: float) -> list[str]:
    """The weekly DAG's deadline-alert callback (an Airflow `SyncCallback`): Airflow calls it with the
    simple context of the missed deadline when a run is still going past its deadline."""
    return send(*late_message(context, late_after_hours), context)


class ShoeFixNotifier(BaseNotifier):
    """`on_failure_callback=ShoeFixNotifier("failure")`; `on_success_callback=ShoeFixNotifier("champion")`
    or `ShoeFixNotifier("use")` (the weekly summary of served answers)."""

    template_fields = ()

    def __init__(self, event: str) -> None:
        if event not in ("failure", "champion", "use"):
            raise ValueError(f"event must be 'failure', 'champion' or 'use', got {event!r}")
        super().__init__()
        self.event = event

    def notify(self, context) -> None:
        message = {"failure": failure_message, "champion": champion_message, "use": use_message}[self.event](context)
        if message is not None:
            send(*message, context)

