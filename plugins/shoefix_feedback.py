"""The ShoeFix page's part of the loop: recent served answers an expert can mark wrong, and the questions
people ask that the corpus does not answer (imported by shoefix_page on a request, never at plugin load).

POST /shoefix/feedback (form: answer_id, corrected_answer, source, reason, topic) records a correction
through `shoefix_tasks.registry.feedback.submit`: MLflow feedback on the answer's trace, and a
candidate record in the inbox's `feedback/` folder that the next run collects and validates like any
other. Who may correct: the page itself only needs the ShoeFix view; a correction teaches the
expert, so it needs more. Under Airflow's SimpleAuthManager (roles viewer < user < op < admin) the
user's role must be one of SHOEFIX_REVIEWER_ROLES (default `op,admin`); under another auth manager
(FAB, Keycloak...) the user must be allowed PUT on the custom view "ShoeFix feedback", which that
manager's roles grant. The reviewer recorded is the signed-in user's name, never a form field.
"""

from __future__ import annotations

import os
from html import escape
from typing import Any

from shoefix_tasks.config import TOPICS

FEEDBACK_RESOURCE = "ShoeFix feedback"
MAX_ANSWER_CHARS = 8000


def _e(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def reviewer_roles() -> set[str]:
    return {r.strip() for r in os.environ.get("SHOEFIX_REVIEWER_ROLES", "op,admin").split(",") if r.strip()}


def can_correct(user: Any, auth_manager: Any) -> bool:
    role = getattr(user, "role", None)
    if role is not None or type(auth_manager).__name__ == "SimpleAuthManager":
        return str(role or "").lower() in reviewer_roles()
    return bool(auth_manager.is_authorized_custom_view(method="PUT", resource_name=FEEDBACK_RESOURCE, user=user))


def answers_card(rows: list[dict[str, Any]], may_correct: bool, notice: str = "", error: str = "") -> str:
    head = '<div class="card" id="answers"><h2>Recent answers</h2>'
    msg = (f'<p class="ok">{_e(notice)}</p>' if notice else "") + (f'<p class="err">{_e(error)}</p>' if error else "")
    if not rows:
        return head + msg + '<p class="muted">No answer served yet (answers come from <code>shoefix serve</code>).</p></div>'
    topics = "".join(f'<option value="{_e(t)}">{_e(t)}</option>' for t in TOPICS)
    items = []
    for a in rows:
        state = ('<span class="pill ok">corrected</span>' if a["corrected"] else "")
        form = ""
        if may_correct:
            form = (f'<details><summary>Mark wrong and correct it</summary><form method="post" action="feedback">'
                    f'<input type="hidden" name="answer_id" value="{_e(a["answer_id"])}">'
                    f'<label>Corrected answer<textarea name="corrected_answer" rows="4" required '
                    f'maxlength="{MAX_ANSWER_CHARS}"></textarea></label>'
                    f'<label>Source (citation or URL)<input name="source" required maxlength="500"></label>'
                    f'<label>What was wrong<input name="reason" maxlength="500"></label>'
                    f'<label>Topic <select name="topic"><option value="">nearest corpus topic</option>{topics}'
                    f'</select></label><button type="submit">Send correction</button></form></details>')
        items.append(f'<li><b>{_e(a["question"][:300])}</b> <span class="muted">v{_e(a["model_version"])} · '
                     f'{_e(a.get("latency_s"))} s · <code>{_e(a["answer_id"][:12])}</code></span> {state}'
                     f'<div class="answer">{_e(a["answer"][:1200])}</div>{form}</li>')
    who = ("" if may_correct else '<p class="muted">Correcting answers needs a reviewer role '
           f'({_e(", ".join(sorted(reviewer_roles())))}).</p>')
    return head + msg + who + '<ul class="answers">' + "".join(items) + "</ul></div>"


def coverage_card(cov: dict[str, Any]) -> str:
    head = '<div class="card" id="coverage"><h2>Asked, not in the corpus</h2>'
    log = cov["log"]
    meta = (f'<p class="muted">{_e(cov["answers"])} answers logged · {_e(log["pending"])} waiting for MLflow · '
            f'{_e(log["dropped"])} dropped (log full)</p>')
    if not cov["uncovered"]:
        return head + meta + '<p class="muted">Every question asked so far has a close corpus question.</p></div>'
    parts = []
    for topic, rows in cov["by_topic"].items():
        lis = "".join(f'<li>{_e(r["question"][:300])} <span class="muted">× {_e(r["asked"])}</span></li>' for r in rows)
        parts.append(f"<h3>{_e(topic)}</h3><ul>{lis}</ul>")
    return (head + meta + '<p class="muted">Most asked first, under the topic of the nearest corpus question: '
            "what experts could write next.</p>" + "".join(parts) + "</div>")
