"""`shoefix` — operator commands over the same store the DAGs use.

  shoefix seed-inbox              copy the starter corpus (data/corpus) into the inbox
  shoefix status                  champion, challenger, last scorecard, how to open the MLflow UI
  shoefix serve                   serve the champion over HTTP (OpenAI-compatible; reloads when it moves)
  shoefix ask "question"          ask the server (`shoefix serve`, SHOEFIX_SERVING_URL), streaming the
                                  answer; if none answers there, load the champion in this process
                                  (slow, says so on stderr; --server-only makes that an error instead)
  shoefix rollback --to N --reason "..." [--force]   make version N champion again (--force: even
                                  a version the gate did not promote; recorded as rollback-forced)
  shoefix history                 who held `champion`, when and why
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from shoefix_tasks.config import REGISTERED_MODEL, Settings


def cmd_seed_inbox(settings: Settings, _args) -> int:
    inbox = Path(settings.inbox)
    inbox.mkdir(parents=True, exist_ok=True)
    src = sorted((settings.data_dir / "corpus").glob("*.jsonl"))
    for path in src:
        target = inbox / f"starter-{path.name}"
        if not target.exists():
            shutil.copyfile(path, target)
    print(f"starter corpus: {len(src)} files in {inbox}")
    return 0


def _latest_evaluation(settings: Settings) -> dict | None:
    files = sorted(settings.runs_dir.glob("*/evaluation.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(files[-1].read_text()) if files else None


def cmd_status(settings: Settings, _args) -> int:
    from shoefix_tasks.evaluation.report import scorecard_text
    from shoefix_tasks.registry import versions as registry
    from shoefix_tasks.store import tracking

    tracking.configure(settings)
    champ, chall = registry.version_by_alias(registry.CHAMPION), registry.version_by_alias(registry.CHALLENGER)
    evaluation = _latest_evaluation(settings)
    if evaluation is not None:  # the last one evaluated, not necessarily from the last pipeline run: say which
        from datetime import UTC, datetime

        run = evaluation.get("run_key")
        path = settings.run_dir(run) / "evaluation.json" if run else None
        when = (f"{datetime.fromtimestamp(path.stat().st_mtime, UTC):%Y-%m-%d %H:%M} UTC"
                if path is not None and path.is_file() else "at an unknown time")
        print(f"\nScorecard of the last evaluation: run {run or '(unknown)'}, evaluated {when} "
              f"({evaluation['champion']['label']} = before, challenger = after):\n")
        print(scorecard_text(evaluation))
    champ_s = f"v{champ.version}" if champ else "none (the base model serves)"
    chall_s = f"v{chall.version}" if chall else "none"
    print(f"\nRegistry {REGISTERED_MODEL}: champion = {champ_s}, challenger = {chall_s}")
    if chall is not None:
        print(f"  v{chall.version} gate decision: {chall.tags.get('gate_decision')} (challenged {chall.tags.get('challenged')})")
        gate = tracking.json_tag(chall.tags, "gate_reasons", [])
        for reason in [f"{gate} (cut short)"] if isinstance(gate, str) else gate:
            print(f"    - {reason}")
    print("\nBrowse the registry in the MLflow UI:\n"
          f"  .venv/bin/mlflow ui --backend-store-uri {settings.tracking_uri} --port 5000\n"
          f"  then open http://127.0.0.1:5000/#/models/{REGISTERED_MODEL}")
    return 0


def cmd_serve(settings: Settings, args) -> int:
    from dataclasses import replace

    from shoefix_tasks.config import ServeConfig
    from shoefix_tasks.ops.server import serve

    logging.getLogger().setLevel(logging.INFO)
    cfg = ServeConfig.from_env()
    given = {k: v for k, v in (("host", args.host), ("port", args.port), ("poll_s", args.poll_s),
                               ("queue_size", args.queue_size)) if v is not None}
    serve(settings, replace(cfg, **given, url="") if given else cfg)
    return 0


def cmd_ask(settings: Settings, args) -> int:
    from shoefix_tasks.config import ServeConfig
    from shoefix_tasks.ops import client

    url = ServeConfig.from_env().url
    try:
        for event in client.stream(url, args.question, args.max_new_tokens):
            if "text" in event:
                print(event["text"], end="", flush=True)
        print()
        return 0
    except client.ServerDown as down:
        if args.server_only:
            raise
        print(f"shoefix ask: {down}; answering in this process instead (loads the model: slow)", file=sys.stderr)
    except client.ServerError as err:
        wait = f" (busy: retry in {err.retry_after_s} s)" if err.code == "queue_full" and err.retry_after_s else ""
        raise RuntimeError(f"the server at {url} answered {err.status}: {err}{wait}") from None
    import mlflow  # the registered model, as `mlflow models serve` serves it; it applies the safety net too

    from shoefix_tasks.store import tracking
    tracking.configure(settings)
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}@champion")
    params = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else None  # default: as evaluated
    print(model.predict([args.question], params=params)[0])
    return 0


def cmd_rollback(settings: Settings, args) -> int:
    from shoefix_tasks.registry import versions as registry
    from shoefix_tasks.store import tracking
    tracking.configure(settings)
    print(json.dumps(registry.rollback(settings, args.to, args.reason, args.actor, force=args.force)))
    return 0


def cmd_history(settings: Settings, _args) -> int:
    from shoefix_tasks.registry import versions as registry
    for row in registry.champion_history(settings):
        print(f"{row['at']:%Y-%m-%d %H:%M} v{row['version']:<3} {row['action']:<15} by {row['actor']}: {row['reason']}")
    return 0


def cmd_feedback(settings: Settings, args) -> int:
    """Experts' corrections of served answers (registry.feedback), from the terminal."""
    from shoefix_tasks.registry import feedback

    if args.action == "correct":
        if not args.answer_id:
            raise feedback.FeedbackError("feedback correct needs the answer's id (shown with every served answer)")
        c = feedback.Correction(args.answer_id, args.answer or "", args.source or "", args.reviewer,
                                args.reason or "", args.topic)
        print(json.dumps(feedback.submit(settings, c)))
        return 0
    records = feedback.list_feedback(settings)
    status = feedback.intake_status(settings, [r["id"] for r in records])
    if args.action == "export":
        out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout  # noqa: SIM115 - stdout or a file
        for r in records:
            out.write(json.dumps({**{k: v for k, v in r.items() if k != "_file"}, "intake": status.get(r["id"])},
                                 ensure_ascii=False) + "\n")
        if args.out:
            out.close()
        return 0
    for r in records:
        p, st = r["provenance"], status.get(r["id"], {"status": "in inbox, not collected yet"})
        print(f"{r['created']} {r['id']:<34} v{p['model_version']:<4} by {p['reviewer']}: {st['status']}"
              f"{' (' + st['reason'] + ')' if st.get('reason') else ''}\n    Q: {r['question'][:100]}")
    return 0


def cmd_answers(settings: Settings, args) -> int:
    """The served-answer log (registry.answer_log): send waiting traces, or list what the corpus lacks."""
    if args.action == "flush":
        from shoefix_tasks.registry import answer_log, feedback

        print(json.dumps({**answer_log.flush(settings), "feedback_attached": feedback.attach_pending(settings)}))
        return 0
    from shoefix_tasks.ops import dashboard

    cov = dashboard.asked_not_covered(settings, args.top)
    for topic, rows in cov["by_topic"].items():
        print(f"{topic}:")
        for r in rows:
            print(f"  {r['asked']:>3} x  {r['question'][:120]}")
    print(f"({cov['answers']} answers logged; {len(cov['uncovered'])} questions without a close corpus question)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shoefix", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("seed-inbox").set_defaults(fn=cmd_seed_inbox)
    sub.add_parser("status").set_defaults(fn=cmd_status)
    srv = sub.add_parser("serve", help="the champion behind /v1/chat/completions (config: SHOEFIX_SERVE_*)")
    srv.add_argument("--host", default=None, help="default SHOEFIX_SERVE_HOST or 127.0.0.1")
    srv.add_argument("--port", type=int, default=None, help="default SHOEFIX_SERVE_PORT or 8765")
    srv.add_argument("--poll-s", type=float, default=None, help="seconds between reads of alias champion")
    srv.add_argument("--queue-size", type=int, default=None, help="questions that may wait; more get 503")
    srv.set_defaults(fn=cmd_serve)
    ask = sub.add_parser("ask")
    ask.add_argument("question")
    ask.add_argument("--max-new-tokens", type=int, default=None,
                     help="cap on the answer's length (default: the server's, SHOEFIX_SERVE_MAX_TOKENS)")
    ask.add_argument("--server-only", action="store_true",
                     help="fail when no server answers instead of loading the champion in this process")
    ask.set_defaults(fn=cmd_ask)
    rb = sub.add_parser("rollback")
    rb.add_argument("--to", type=int, required=True, help="registry version to make champion")
    rb.add_argument("--reason", required=True, help="why (kept in the champion history)")
    rb.add_argument("--force", action="store_true",
                    help="allow a version the gate did not promote; recorded as action rollback-forced")
    rb.add_argument("--actor", default="cli")
    rb.set_defaults(fn=cmd_rollback)
    sub.add_parser("history").set_defaults(fn=cmd_history)
    fb = sub.add_parser("feedback", help="experts' corrections of served answers")
    fb.add_argument("action", choices=["list", "export", "correct"])
    fb.add_argument("answer_id", nargs="?", help="correct: the served answer's id")
    fb.add_argument("--answer", help="correct: the right answer")
    fb.add_argument("--source", help="correct: where it comes from (citation or URL)")
    fb.add_argument("--reason", help="correct: what was wrong")
    fb.add_argument("--topic", help="correct: default the nearest corpus question's topic")
    fb.add_argument("--reviewer", default=os.environ.get("USER", "cli"), help="correct: who corrects it")
    fb.add_argument("--out", help="export: a file instead of stdout")
    fb.set_defaults(fn=cmd_feedback)
    an = sub.add_parser("answers", help="the served-answer log: flush traces to MLflow, or questions not covered")
    an.add_argument("action", choices=["flush", "uncovered"])
    an.add_argument("--top", type=int, default=30)
    an.set_defaults(fn=cmd_answers)
    return p


def one_line(err: BaseException) -> str:
    """An error as one line a person can act on: MLflow's REST errors carry their message after a
    code; everything else its first line."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    code = getattr(err, "error_code", None)
    if code == "RESOURCE_DOES_NOT_EXIST":
        text = f"not found: {text}"
    return text[:300]


def main(argv: list[str] | None = None) -> int:
    """Exit 0 on success, 2 when a request is refused (a PermanentError: a retry would be refused
    again), 1 on any other error; one line on stderr, no traceback (SHOEFIX_DEBUG=1 shows it)."""
    from shoefix_tasks.errors import PermanentError

    logging.basicConfig(level=logging.WARNING)
    # MLflow announces at INFO that it creates its tables on a store's first use: not news to an operator,
    # and it would turn a one-line error on a fresh installation into three lines
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return args.fn(Settings.from_env(), args)
    except Exception as err:  # noqa: BLE001 - the CLI's one place that turns errors into a sentence
        if os.environ.get("SHOEFIX_DEBUG"):
            raise
        print(f"shoefix {args.cmd}: {'refused: ' if isinstance(err, PermanentError) else ''}{one_line(err)}",
              file=sys.stderr)
        return 2 if isinstance(err, PermanentError) else 1


if __name__ == "__main__":
    sys.exit(main())
