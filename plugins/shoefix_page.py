"""The ShoeFix page: a FastAPI app mounted by the api-server at /shoefix (see shoefix_plugin.py).

GET  /shoefix/      the champion and its scorecard, the newest version that never served and why, the
                    champion history, recent batches' quarantine counts, inbox files deferred (cut-off last record) with their
                    age, a box to ask the champion a question, recent served answers (reviewers
                    can correct them) and the questions asked that the corpus does not cover
POST /shoefix/feedback  an expert's correction of a served answer (shoefix_feedback.py: who may, and
                    what happens to it)
POST /shoefix/ask   the champion's answer (form field `question`), asked of `shoefix serve`
                    (SHOEFIX_SERVING_URL): with `Accept: text/event-stream` as server-sent events
                    ({"text"} pieces, then {"done"} or {"error"}), which the page's one script
                    shows as they come; without it (no script) the whole page with the answer

The api-server never loads a model: answers come from the answer server, which holds the champion
once for every client and answers one at a time (a model inside the api-server took minutes per
answer under load and held a second copy of the weights). When that server is down or busy, the
page says so, naming `shoefix serve`.

Auth: the api-server does not protect plugin apps, so every route depends on Airflow's own
`get_user` (the UI's `_token` cookie or an `Authorization: Bearer` JWT) and asks the configured
auth manager whether the user may see the custom view "ShoeFix" (401/403 otherwise). The cookie is
SameSite=Lax, so another site cannot POST a question with it.

Server-rendered HTML without external resources; every value passes through `html.escape`. The
Content-Security-Policy allows exactly one script, the ask box's (by its sha256), which writes the
answer with `textContent` only, and lets it connect to this origin alone.
Listed in plugins/.airflowignore: imported on the first request, never when plugins load.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Iterator
from html import escape
from typing import Annotated, Any

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.core_api.security import GetUserDep
from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from shoefix_tasks.config import Settings

log = logging.getLogger(__name__)
RESOURCE = "ShoeFix"
MAX_QUESTION_CHARS = 2000
# The ask box's script: send the form, read the server-sent events, append the text as it comes.
SCRIPT = """
const form = document.getElementById('ask'), out = document.getElementById('answer'),
  meta = document.getElementById('meta'), err = document.getElementById('ask-error');
form.addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const button = form.querySelector('button');
  out.textContent = ''; out.hidden = false; err.textContent = ''; meta.textContent = 'asking…';
  button.disabled = true;
  try {
    const r = await fetch('ask', {method: 'POST', body: new URLSearchParams(new FormData(form)),
      headers: {'Accept': 'text/event-stream'}});  // fetch sends this origin's cookie by default
    if (!r.ok) { const j = await r.json().catch(() => ({})); throw new Error(j.error || 'HTTP ' + r.status); }
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = '';
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let i;
      while ((i = buf.indexOf('\\n\\n')) >= 0) {
        const line = buf.slice(0, i); buf = buf.slice(i + 2);
        if (!line.startsWith('data: ')) continue;
        const d = JSON.parse(line.slice(6));
        if (d.error) throw new Error(d.error);
        if (d.text) { out.textContent += d.text; meta.textContent = 'writing…'; }
        if (d.done) meta.textContent = 'answered by v' + d.done.version + ' in ' + d.done.seconds + ' s' +
          (d.done.answer_id ? ' · answer ' + d.done.answer_id.slice(0, 12) : '');
      }
    }
  } catch (e) { err.textContent = e.message; meta.textContent = ''; if (!out.textContent) out.hidden = true; }
  finally { button.disabled = false; }
});
"""
SCRIPT_HASH = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
HEADERS = {
    "Content-Security-Policy": f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{SCRIPT_HASH}'; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;padding:20px 28px;color:#1d2733;background:#f6f8fa}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:0 0 10px}
.sub{color:#5b6876;margin-bottom:18px}
.card{background:#fff;border:1px solid #d8dee4;border-radius:8px;padding:16px 18px;margin-bottom:16px}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:16px}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #eaeef2;
vertical-align:top}th{color:#5b6876;font-weight:600;font-size:12px;text-transform:uppercase}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.big{font-size:28px;font-weight:700}.pill{display:inline-block;padding:1px 8px;border-radius:10px;
font-size:12px;background:#e7f0fe;color:#1f5fbf}.ok{background:#e6f6ea;color:#1a7f37}
.bad{background:#fdecea;color:#b42318}.muted{color:#5b6876}.err{color:#b42318;font-weight:600}
textarea{width:100%;box-sizing:border-box;font:inherit;padding:8px;border:1px solid #c5ced8;border-radius:6px}
button{margin-top:8px;padding:6px 16px;font:inherit;border:0;border-radius:6px;background:#1f5fbf;color:#fff}
label{display:block;margin-top:6px;font-size:12px;color:#5b6876}input,select{width:100%;box-sizing:border-box;
font:inherit;padding:5px 8px;border:1px solid #c5ced8;border-radius:6px}ul.answers{list-style:none;margin:0;padding:0}
ul.answers>li{border-top:1px solid #eaeef2;padding:8px 0}details{margin-top:6px}h3{font-size:13px;margin:10px 0 2px}
.answer{white-space:pre-wrap;background:#f6f8fa;border-left:3px solid #1f5fbf;padding:10px 12px;margin-top:12px}
code{font-size:12px}ul{margin:6px 0 0 18px;padding:0}.nw{white-space:nowrap}
"""


def _e(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def _when(value: Any) -> str:
    return _e(f"{value:%Y-%m-%d %H:%M} UTC" if hasattr(value, "strftime") else value or "unknown")


def _champion_card(champ: dict[str, Any] | None, card: dict[str, Any] | None) -> str:
    if champ is None:
        return ('<div class="card"><h2>Champion</h2><p class="err">No champion yet.</p><p class="muted">'
                "No registry version holds alias <code>champion</code>; the base model without adapter "
                "is what a first challenger is compared against.</p></div>")
    tags = champ["tags"]
    decision = tags.get("gate_decision") or "unknown"
    facts = "".join(f"<tr><th>{_e(k.replace('_', ' '))}</th><td><code>{_e(tags.get(k))}</code></td></tr>"
                    for k in ("recipe", "base_model", "training_run", "pipeline_run") if tags.get(k))
    # content hashes, shortened: which recipe text, corpus and frozen holdout made this champion
    for key, label in (("recipe_sha256", "recipe content"), ("corpus_snapshot", "corpus snapshot"),
                       ("holdout_hash", "holdout")):
        if tags.get(key):
            facts += f"<tr><th>{label}</th><td><code>{_e(tags[key][:16])}…</code></td></tr>"
    why = "" if champ["action"] in (None, "promote") else f'<p>why: {_e(champ["reason"])}</p>'
    if tags.get("trigger_reason"):  # the run that made this version was asked for, with a reason
        by = f' (by {_e(tags["triggered_by"])})' if tags.get("triggered_by") else ""
        why = f'<p class="trigger">triggered because: {_e(tags["trigger_reason"])}{by}</p>' + why
    out = [f'<div class="card"><h2>Champion</h2><div class="big">v{_e(champ["version"])}</div>',
           f'<p>since {_when(champ["since"])} · {_e(champ["action"] or "promote")} by {_e(champ["actor"])} · '
           f'gate <span class="pill {"ok" if decision == "promote" else "bad"}">{_e(decision)}</span> '
           f'against {_e(tags.get("challenged"))}</p>',
           f'{why}<table>{facts}</table></div>']
    if card is not None:
        rows = "".join(f'<tr><td>{_e(name)}</td><td class="n">{before:.2f}</td><td class="n">{after:.2f}</td>'
                       f'<td class="n">{_e(change)}</td></tr>' for name, before, after, change in card["rows"])
        out.append(f'<div class="card"><h2>Scorecard of v{_e(champ["version"])} when it was evaluated</h2>'
                   f'<table><tr><th>metric</th><th>{_e(card["champion_label"])} (before)</th><th>v'
                   f'{_e(champ["version"])} (after)</th><th>change</th></tr>{rows}</table>'
                   f'<p class="muted">{_e(card["questions"])} holdout + {_e(card["guard"])} guard questions; '
                   f'holdout <code>{_e(card["holdout_hash"][:12])}</code></p>'
                   f'{_gate_list(champ["gate_reasons"])}</div>')
    return "".join(out)


def _gate_list(reasons: list[str] | str) -> str:
    """The gate's reasons as a list (a tag cut short arrives as one string)."""
    items = "".join(f"<li>{_e(r)}</li>" for r in ([f"{reasons} (cut short)"] if isinstance(reasons, str) else reasons))
    return f"<b>Gate</b><ul>{items}</ul>" if items else ""


def _challenger_card(ch: dict[str, Any] | None) -> str:
    """The newest version that never served, and why: no gate decision yet, held for review, refused at
    review, or kept out by the gate (its reasons, and the forbidden claims it stated)."""
    if ch is None:
        return ""
    tags = ch["tags"]
    decision, review = tags.get("gate_decision"), tags.get("review")
    if decision is None:
        state = "no gate decision yet (being evaluated or registered, or stopped there)"
    elif review == "pending":
        state = "held for review"
    elif review and review != "approved":
        state = f"not promoted: review {review}"
    else:
        state = "not promoted by the gate"
    claims = ch["forbidden_claims"]
    if isinstance(claims, dict):
        claims = "".join(f"<li><code>{_e(q)}</code>: {_e(', '.join(map(str, c)) if isinstance(c, list) else c)}</li>"
                         for q, c in claims.items())
    else:  # a tag cut short (a version registered before promotion fitted its JSON to the tag)
        claims = f"<li>{_e(claims)} (cut short)</li>"
    composite = f' · composite {_e(tags["composite"])}' if tags.get("composite") else ""
    run = f' · run <code>{_e(tags["pipeline_run"])}</code>' if tags.get("pipeline_run") else ""
    gate = (f'<p>gate <span class="pill {"ok" if decision == "promote" else "bad"}">{_e(decision)}</span> against '
            f'{_e(tags.get("challenged"))}{composite}{run}</p>') if decision else ""
    verdict = (f'<p>review: {_e(review)}{" by " + _e(tags["reviewed_by"]) if tags.get("reviewed_by") else ""}'
               f'{": " + _e(tags["review_comment"]) if tags.get("review_comment") else ""}</p>') if review else ""
    return (f'<div class="card"><h2>Latest challenger: {_e(state)}</h2><div class="big">v{_e(ch["version"])}</div>'
            f'{gate}{verdict}{_gate_list(ch["gate_reasons"])}'
            f'{"<b>Forbidden claims it stated</b><ul>" + claims + "</ul>" if claims else ""}</div>')


def _history_card(events: list[dict[str, Any]]) -> str:
    rows = "".join(f'<tr><td class="nw">{_when(h["at"])}</td><td>v{_e(h["version"])}</td><td>'
                   f'{_e("v" + str(h["previous_version"]) if h["previous_version"] else "base")}</td>'
                   f'<td>{_e(h["action"])}</td><td>{_e(h["actor"])}</td><td>{_e(h["reason"])}</td></tr>'
                   for h in events)
    body = (f"<table><tr><th>when</th><th>champion</th><th>replaced</th><th>action</th><th>by</th>"
            f"<th>reason</th></tr>{rows}</table>") if events else '<p class="muted">No champion change yet.</p>'
    return f'<div class="card"><h2>Champion history</h2>{body}</div>'


def _batches_card(batches: list[dict[str, Any]]) -> str:
    if not batches:
        return '<div class="card"><h2>Recent batches</h2><p class="muted">No batch collected yet.</p></div>'
    rows = []
    for b in batches:
        c = b["counts"]
        seen = sum(c.values())
        reasons = "<br>".join(f"{_e(n)} × {_e(k)}" for k, n in sorted(b["reasons"].items(), key=lambda kv: -kv[1]))
        rows.append(f'<tr><td><code>{_e(b["batch_id"])}</code><br><span class="muted">{_when(b["created_at"])}'
                    f'</span></td><td>{_e(b["status"])}</td><td class="n">{seen}</td>'
                    f'<td class="n">{_e(c.get("accepted", 0))}</td><td class="n">{_e(c.get("quarantined", 0))}</td>'
                    f'<td class="n">{_e(c.get("deferred", 0))}</td><td>{reasons or "—"}</td></tr>')
    samples = "".join(f'<li><code>{_e(s["record_id"] or "(no id)")}</code> {_e(s["source"])}:{_e(s["line_no"])} — '
                      f'{_e((s["reason"] or s["check_name"] or "")[:200])}</li>' for s in batches[0]["samples"])
    return ('<div class="card"><h2>Recent batches: quarantine</h2><table><tr><th>batch</th><th>status</th>'
            '<th>records</th><th>accepted</th><th>quarantined</th><th>deferred</th><th>why quarantined</th></tr>'
            + "".join(rows) + "</table>"
            + (f'<p><b>Quarantined in the latest batch</b></p><ul>{samples}</ul>' if samples else "") + "</div>")


def _deferred_card(files: list[dict[str, Any]]) -> str:
    """Inbox files whose last record is cut off, waiting for their writer until the grace ends."""
    if not files:
        return ('<div class="card"><h2>Deferred inbox files</h2><p class="muted">None: no inbox file is waiting '
                "for its writer.</p></div>")
    rows = "".join(
        f'<tr><td><code>{_e(f["name"])}</code></td><td class="n">{_e(format(f["size"], ","))}</td>'
        f'<td class="n">{_e(f["age"])}</td><td class="nw">{_when(f["first_seen"])}</td>'
        f'<td>{"in " + _e(f["due_in"]) if f["due_in_s"] > 0 else "at the next run"}</td></tr>' for f in files)
    return ('<div class="card"><h2>Deferred inbox files</h2><p class="muted">The last record of each is cut off '
            f'(a writer still writing, or one that stopped). Within the grace ({_e(files[0]["grace"])} since the '
            "last write) the file waits; after it, its complete records are read and the cut-off tail is "
            "quarantined as <code>truncated</code>.</p><table><tr><th>file</th><th>bytes</th><th>age</th>"
            f"<th>first seen</th><th>read</th></tr>{rows}</table></div>")


def _ask_card(question: str, reply: dict[str, Any] | None, error: str | None) -> str:
    out = ['<div class="card"><h2>Ask the champion</h2><form method="post" action="ask" id="ask">',
           f'<textarea name="question" rows="3" maxlength="{MAX_QUESTION_CHARS}" required '
           f'placeholder="How do I keep leather boots from going moldy in storage?">{_e(question)}</textarea>',
           '<button type="submit">Ask</button></form>',
           f'<p class="err" id="ask-error">{_e(error or "")}</p>',
           f'<div class="answer" id="answer"{"" if reply else " hidden"}>{_e(reply["answer"] if reply else "")}</div>',
           f'<p class="muted" id="meta">{_answered(reply) if reply else ""}</p>']
    return "".join(out) + "</div>"


def _answered(reply: dict[str, Any]) -> str:
    ident = f' · answer {_e(reply["answer_id"][:12])}' if reply.get("answer_id") else ""
    return f'answered by v{_e(reply.get("version"))} in {_e(reply.get("seconds"))} s{ident}'


def render(settings: Settings, question: str = "", reply: dict[str, Any] | None = None, error: str | None = None,
           may_correct: bool = False, notice: str = "", feedback_error: str = "") -> str:
    from shoefix_feedback import answers_card, coverage_card

    from shoefix_tasks.ops import dashboard
    champ = dashboard.champion(settings)
    card = dashboard.scorecard(settings, champ["tags"].get("evaluation_run")) if champ else None
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>ShoeFix</title>'
            f"<style>{CSS}</style></head><body><h1>ShoeFix expert</h1>"
            f'<div class="sub">registry model <code>shoefix-expert</code> · state <code>{_e(settings.home)}</code>'
            f'</div><div class="grid"><div>{_champion_card(champ, card)}'
            f'{_challenger_card(dashboard.latest_challenger(settings, champ["version"] if champ else None))}</div><div>'
            f"{_ask_card(question, reply, error)}</div></div>"
            f'<div class="grid"><div>{answers_card(dashboard.recent_answers(settings), may_correct, notice, feedback_error)}'
            f"</div><div>{coverage_card(dashboard.asked_not_covered(settings))}</div></div>"
            f"{_history_card(dashboard.history(settings, 20))}"
            f"{_batches_card(dashboard.recent_batches(settings))}{_deferred_card(dashboard.deferred_files(settings))}"
            f"<script>{SCRIPT}</script></body></html>")


def _ask_failure(err: Exception, url: str) -> tuple[int, str]:
    """(status, sentence) for a question the answer server did not answer."""
    from shoefix_tasks.ops import client

    if isinstance(err, client.ServerDown):
        return 503, (f"The ShoeFix answer server is not running (nothing answers at {url}). Start it with "
                     "`shoefix serve`.")
    if isinstance(err, client.ServerError) and err.code == "queue_full":
        return 503, f"The answer server is busy; try again in {err.retry_after_s or 'a few'} s."
    if isinstance(err, client.ServerError) and err.code == "not_serving":
        return 503, f"The answer server has no champion to serve: {err}"
    return 502, f"The answer server could not answer: {err}"


def _events(first: dict[str, Any], rest: Iterator[dict[str, Any]], url: str) -> Iterator[bytes]:
    """The server's answer as the page's events; a failure mid-answer becomes an {"error"} event."""
    try:
        yield f"data: {json.dumps(first, ensure_ascii=False)}\n\n".encode()
        for event in rest:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()
    except Exception as err:  # noqa: BLE001 - the stream has started: report in-band
        log.warning("the answer server failed mid-answer: %s", err)
        yield f"data: {json.dumps({'error': _ask_failure(err, url)[1]})}\n\n".encode()


def build_app() -> FastAPI:
    def allowed(method: str):
        def check(user: GetUserDep):
            if not get_auth_manager().is_authorized_custom_view(method=method, resource_name=RESOURCE, user=user):
                raise HTTPException(status_code=403, detail="not allowed to use the ShoeFix page")
            return user
        return check

    app = FastAPI(title="ShoeFix", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/", response_class=HTMLResponse)
    def page(user: Any = Depends(allowed("GET"))) -> HTMLResponse:  # noqa: B008 - FastAPI's dependency idiom
        from shoefix_feedback import can_correct

        return HTMLResponse(render(Settings.from_env(), may_correct=can_correct(user, get_auth_manager())),
                            headers=HEADERS)

    @app.post("/feedback", response_class=HTMLResponse)
    def correct(answer_id: Annotated[str, Form(max_length=64)],
                corrected_answer: Annotated[str, Form(max_length=8000)], source: Annotated[str, Form(max_length=500)],
                reason: Annotated[str, Form(max_length=500)] = "", topic: Annotated[str, Form(max_length=40)] = "",
                user: Any = Depends(allowed("POST"))) -> HTMLResponse:  # noqa: B008 - FastAPI's dependency idiom
        """An expert's correction (registry.feedback.submit); the reviewer is the signed-in user."""
        from shoefix_feedback import can_correct

        from shoefix_tasks.registry import feedback

        settings = Settings.from_env()
        if not can_correct(user, get_auth_manager()):
            raise HTTPException(status_code=403, detail="correcting answers needs a reviewer role")
        try:
            out = feedback.submit(settings, feedback.Correction(answer_id.strip(), corrected_answer, source,
                                                                user.get_name(), reason, topic or None))
        except feedback.FeedbackError as err:
            return HTMLResponse(render(settings, may_correct=True, feedback_error=str(err)), status_code=400,
                                headers=HEADERS)
        note = (f"Thank you: correction {out['record_id']} is in the inbox ({out['inbox_file']}); the next run "
                "collects and validates it" + ("" if out["feedback_logged"] else "; its MLflow feedback waits for the "
                                              "answer's trace") + ".")
        return HTMLResponse(render(settings, may_correct=True, notice=note), headers=HEADERS)

    @app.post("/ask", response_model=None, dependencies=[Depends(allowed("POST"))])
    def ask(question: Annotated[str, Form(max_length=MAX_QUESTION_CHARS)],
            request: Request) -> HTMLResponse | JSONResponse | StreamingResponse:
        from shoefix_tasks.config import ServeConfig
        from shoefix_tasks.ops import client

        settings, url = Settings.from_env(), ServeConfig.from_env().url
        streamed = "text/event-stream" in request.headers.get("accept", "")
        question = question.strip()
        if not question:
            if streamed:
                return JSONResponse({"error": "Type a question first."}, 400, headers=HEADERS)
            return HTMLResponse(render(settings, error="Type a question first."), status_code=400, headers=HEADERS)
        try:
            if streamed:  # open the stream here, so that a server that is down or busy gets a status code
                events = client.stream(url, question)
                first = next(events, {"error": "The answer server sent no answer."})
                return StreamingResponse(_events(first, events, url), media_type="text/event-stream", headers=HEADERS)
            reply = client.answer(url, question)
        except (client.ServerDown, client.ServerError) as err:
            status, message = _ask_failure(err, url)
            log.warning("ShoeFix page: %s", message)
            if streamed:
                return JSONResponse({"error": message}, status, headers=HEADERS)
            return HTMLResponse(render(settings, question, error=message), status_code=status, headers=HEADERS)
        return HTMLResponse(render(settings, question, reply), headers=HEADERS)

    return app
