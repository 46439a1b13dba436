"""A person's hold on a promotion (policy `promotion.mode: review`, or a run that asked for it).

The gate decides whether a challenger *may* become champion; under review a person decides whether
it *does*. The gate's version is registered (alias `challenger`) but `champion` stays put until an
Airflow human-in-the-loop task gets an answer:

- `review_body` writes what the reviewer sees: the scorecard and the gate's reasons, the bootstrap
  intervals, every guard question, and the questions whose answers changed most, side by side;
- `review_verdict` is the pure decision on the answer. Only an explicit Approve from a named person
  promotes, and only if the champion is still the one the gate compared against; a rejection, no
  answer before the deadline, an answer nobody signed (Airflow's timeout defaults) or anything
  unexpected keeps the champion (fail closed);
- `apply_review` acts on the verdict under the promotion lease and records it in the champion
  history (who, why) and on the version's tags, so the registry and `shoefix history` both tell.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from shoefix_tasks.config import REGISTERED_MODEL, Settings

log = logging.getLogger(__name__)
APPROVE, REJECT = "Approve", "Reject"
OPTIONS = [APPROVE, REJECT]
# champion_history.action of a review that did not move the champion (its `version` is the candidate)
NOT_PROMOTED_ACTIONS = ("review-rejected", "review-timeout", "review-stale")
APPROVED_ACTION = "promote-reviewed"
ANSWER_CHARS = 400  # per answer in the side-by-side table: enough to judge, short enough to scan
CHANGED_ROWS = 5


@dataclass(frozen=True)
class ReviewVerdict:
    promote: bool
    outcome: str  # approved | rejected | timeout | stale
    reviewer: str | None
    comment: str
    reason: str  # one line for the champion history

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def review_verdict(response: dict[str, Any] | None, candidate: int, champion_at_gate: int | None,
                   champion_now: int | None) -> ReviewVerdict:
    """What to do with the approval task's answer (its XCom; None when it timed out or failed)."""
    if not response:
        # no XCom: Airflow's deadline passed unanswered (HITLTimeoutError), or the task failed on an
        # answer it could not accept; either way nobody approved
        return ReviewVerdict(False, "timeout", None, "",
                             f"v{candidate} not promoted: no decision was recorded (the review timed out, or its "
                             "task failed)")
    user = response.get("responded_by_user") or {}
    reviewer = user.get("name") or user.get("id") or None
    comment = str((response.get("params_input") or {}).get("comment") or "").strip()
    said = f": {comment}" if comment else ""
    chosen = list(response.get("chosen_options") or [])
    if reviewer is None:  # Airflow filled in defaults at the deadline: nobody decided
        return ReviewVerdict(False, "timeout", None, comment,
                             f"v{candidate} not promoted: the review expired without a person's answer")
    if chosen != [APPROVE]:
        what = "rejected" if chosen == [REJECT] else f"answered {chosen!r} (not an approval)"
        return ReviewVerdict(False, "rejected", reviewer, comment, f"v{candidate} {what} by {reviewer}{said}")
    if champion_now != champion_at_gate:
        label = lambda v: f"v{v}" if v is not None else "base"  # noqa: E731
        return ReviewVerdict(False, "stale", reviewer, comment,
                             f"v{candidate} approved by {reviewer}{said}, but the champion moved from "
                             f"{label(champion_at_gate)} to {label(champion_now)} while the review waited; the gate "
                             "compared against the old one, so it is not promoted (run the pipeline again)")
    return ReviewVerdict(True, "approved", reviewer, comment, f"approved by {reviewer}{said}")


def _cell(text: str, limit: int = ANSWER_CHARS) -> str:
    """Answer text as one Markdown table cell: one line, pipes escaped, cut at `limit` characters."""
    flat = " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;")
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


def review_body(evaluation: dict[str, Any], decision: dict[str, Any], version: int,
                questions: dict[str, str], rows: int = CHANGED_ROWS) -> str:
    """Markdown for the approval task: everything a reviewer needs without opening MLflow."""
    from shoefix_tasks.evaluation.report import scorecard_markdown

    n = decision.get("numbers", {})
    champ = evaluation["champion"]["label"]
    before = {s["id"]: s for s in evaluation["champion"]["scores"]}
    after = {s["id"]: s for s in evaluation["challenger"]["scores"]}
    conf = f"{n.get('confidence', 0.95):.0%}"
    lines = [f"### Challenger v{version} vs {champ}: the gate passed; approve to make it champion", "",
             scorecard_markdown(evaluation, decision), "", "#### Bootstrap intervals (challenger - champion)", "",
             f"- composite: {n.get('mean_diff', 0):+.3f}, {conf} CI [{n.get('ci_low', 0):+.3f}, "
             f"{n.get('ci_high', 0):+.3f}] over {n.get('n_questions', '?')} holdout questions "
             f"(min effect {n.get('min_effect')})",
             f"- key-data accuracy: {n.get('key_data_diff', 0):+.3f}, {conf} CI [{n.get('key_data_ci_low', 0):+.3f}, "
             f"{n.get('key_data_ci_high', 0):+.3f}] (margin -{n.get('key_data_margin')})", "",
             "#### Guard questions", "", f"| guard | {champ} | challenger | safe advice lost | forbidden advice |",
             "|---|---|---|---|---|"]
    lost, forbidden = n.get("guard_claims_lost", {}), n.get("forbidden_claims", {})
    for g in evaluation["guard_ids"]:
        if g in before and g in after:
            lines.append(f"| {g} | {before[g]['composite']:.2f} | {after[g]['composite']:.2f} | "
                         f"{_cell(', '.join(lost.get(g, [])) or '-')} | {_cell(', '.join(forbidden.get(g, [])) or '-')} |")
    changed = sorted((i for i in after if i in before),
                     key=lambda i: (-abs(after[i]["composite"] - before[i]["composite"]), i))[:rows]
    lines += ["", f"#### The {len(changed)} answers that changed most", "",
              f"| question | {champ} | challenger v{version} |", "|---|---|---|"]
    for i in changed:
        b, a = before[i], after[i]
        lines.append(f"| **{i}** {_cell(questions.get(i, ''), 200)} | {_cell(b.get('answer', ''))} "
                     f"({b['composite']:.2f}) | {_cell(a.get('answer', ''))} ({a['composite']:.2f}) |")
    return "\n".join(lines)


def record_not_promoted(settings: Settings, candidate: int, champion: int | None, action: str, reason: str,
                        actor: str) -> None:
    """A review that kept the champion, in the champion history: `version` is the candidate that was
    held back, `previous_version` the champion that stayed. versions.py skips these rows when it
    asks who holds the alias. Idempotent: a retried task does not write the row twice."""
    import sqlalchemy as sa

    from shoefix_tasks.store import ledger

    t = ledger.champion_history
    with ledger.engine_for(settings.ledger_url).begin() as conn:
        seen = conn.execute(sa.select(t.c.event_id).where(t.c.model_name == REGISTERED_MODEL, t.c.version == candidate,
                                                          t.c.action == action)).first()
        if seen is None:
            conn.execute(sa.insert(t), [{"model_name": REGISTERED_MODEL, "version": candidate,
                                         "previous_version": champion, "action": action, "reason": reason[:4000],
                                         "actor": actor[:250], "at": ledger.utcnow()}])


def apply_review(settings: Settings, gated: dict[str, Any], response: dict[str, Any] | None, actor: str,
                 run_key: str) -> dict[str, Any]:
    """Act on the approval task's answer for the version `gated` (gate_and_promote's result), under the
    promotion lease: move `champion` on an approval, record every outcome. Returns a small dict
    shaped like gate_and_promote's (the champion notification reads it)."""
    import mlflow

    from shoefix_tasks.registry import versions as registry
    from shoefix_tasks.store import tracking

    version = int(gated["version"])
    with registry.promotion_lock(settings, f"review:{actor}:{run_key}") as lease:
        champ = registry.version_by_alias(registry.CHAMPION)
        now = int(champ.version) if champ is not None else None
        verdict = review_verdict(response, version, gated.get("champion"), now)
        if now == version:  # a retry after the alias already moved: finish the record, nothing else
            verdict = ReviewVerdict(True, "approved", verdict.reviewer, verdict.comment, verdict.reason)
        who = f"{verdict.reviewer or 'nobody'} (review in {actor} run {run_key})"
        if verdict.promote:
            why = f"{verdict.reason} | gate: {'; '.join(gated.get('reasons', []))}"
            registry.set_champion(settings, version, why, who, action=APPROVED_ACTION, lease=lease)
        else:
            record_not_promoted(settings, version, now, f"review-{verdict.outcome}", verdict.reason, who)
    client = mlflow.MlflowClient()
    for key, value in (("review", verdict.outcome), ("reviewed_by", verdict.reviewer or ""),
                       ("review_comment", verdict.comment[:tracking.TAG_LIMIT])):
        client.set_model_version_tag(REGISTERED_MODEL, str(version), key, value)
    log.info("review of v%s: %s (%s)", version, verdict.outcome, verdict.reason)
    champ = registry.version_by_alias(registry.CHAMPION)
    return {"version": version, "decision": "promote" if verdict.promote else "keep_champion",
            "review": verdict.outcome, "reviewed_by": verdict.reviewer, "reasons": [verdict.reason],
            "champion": int(champ.version) if champ else None, "model": REGISTERED_MODEL,
            "trigger_reason": gated.get("trigger_reason"), "triggered_by": gated.get("triggered_by"),
            "verdict": verdict.to_dict()}
