"""Served answers are traced (PII removed, bounded spool, MLflow down is survived), an expert's correction
becomes MLflow feedback and an inbox record that the next collect and validation take like any other,
and questions the corpus does not answer are listed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shoefix_tasks.intake.asked import by_topic, uncovered
from shoefix_tasks.intake.collect import collect_batch
from shoefix_tasks.intake.validate import validate_batch
from shoefix_tasks.records import iter_jsonl, read_jsonl
from shoefix_tasks.registry import answer_log, feedback
from shoefix_tasks.registry.feedback import Correction, FeedbackError
from shoefix_tasks.store import ledger

REPO = Path(__file__).resolve().parents[2]
CORRECTED = ("Dry soaked boots at room temperature, 20–25 °C, out of direct sun and away from heaters, for "
             "24–48 hours: stuff them with newspaper and change it when it is damp. Heat above about 40 °C "
             "cracks leather and weakens the glue that holds the sole.")


def served(settings, question="How long should soaked leather boots dry? Mail me at jo@example.com",
           answer="Put them on the radiator overnight.", **kw):
    return answer_log.record_answer(settings, question, answer, model_version="3", latency_s=1.25, tokens=40,
                                    engine="llama.cpp", **kw)


def traces_by_answer(answer_id: str):
    import mlflow

    exp = mlflow.get_experiment_by_name(answer_log.AnswerLogConfig.experiment)
    return mlflow.search_traces(locations=[exp.experiment_id], return_type="list",
                                filter_string=f"tags.`shoefix.answer_id` = '{answer_id}'")


def test_answers_are_traced_without_pii_and_survive_mlflow_down(shoefix_env, monkeypatch):
    s = shoefix_env
    first = served(s)
    spooled = next(answer_log.iter_answers(s))
    assert "jo@example.com" not in spooled["question"] and "[email removed]" in spooled["question"]
    assert spooled["redacted"] == ["email"] and "trace_id" not in spooled

    # MLflow unreachable: the flush fails, nothing is lost, the answer stays findable
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    down = answer_log.flush(type(s).from_env())
    assert down["sent"] == 0 and down["error"] and down["pending"] == 1
    second = served(s, question="Do anti-slip soles lose grip when they get moldy?")
    assert answer_log.find_answer(s, first)["answer"] == "Put them on the radiator overnight."

    monkeypatch.setenv("MLFLOW_TRACKING_URI", s.tracking_uri)
    up = answer_log.flush(s)
    assert up == {"sent": 2, "error": None, "pending": 0, "dropped": 0}
    assert answer_log.find_answer(s, first)["trace_id"]
    (trace,) = traces_by_answer(first)
    assert trace.info.tags["shoefix.model_version"] == "3"
    assert "jo@example.com" not in json.dumps(trace.data.request) and "radiator" in json.dumps(trace.data.response)
    assert len(traces_by_answer(second)) == 1
    assert answer_log.flush(s)["sent"] == 0  # nothing sent twice


def test_spool_is_bounded_and_counts_what_it_drops(shoefix_env):
    cfg = answer_log.AnswerLogConfig(max_pending=2)
    ids = [served(shoefix_env, cfg=cfg) for _ in range(3)]
    assert ids[0] and ids[1] and ids[2] is None
    assert answer_log.stats(shoefix_env) == {"pending": 2, "dropped": 1, "sent": 0}


def test_correction_is_feedback_on_the_trace_and_a_record_the_next_run_validates(shoefix_env):
    import mlflow

    s = shoefix_env
    answer_id = served(s)
    answer_log.flush(s)
    out = feedback.submit(s, Correction(answer_id, CORRECTED, source="EPA-MOLD; leather care guide",
                                        reviewer="expert@shoefix", reason="heat damages leather", topic="materials"))
    assert out["feedback_logged"] and out["inbox_file"].startswith("feedback/")
    trace = mlflow.get_trace(out["trace_id"])
    by_name = {a.name: a for a in trace.info.assessments}
    assert by_name["correct"].value is False and by_name["correct"].source.source_id == "expert@shoefix"
    assert by_name["expected_response"].value == CORRECTED

    (rec,) = feedback.list_feedback(s)
    prov = rec["provenance"]
    assert (prov["answer_id"], prov["trace_id"], prov["model_version"], prov["reviewer"]) == (
        answer_id, out["trace_id"], "3", "expert@shoefix")
    assert prov["rejected_answer"] == "Put them on the radiator overnight." and "jo@example.com" not in rec["question"]

    # the next run: the same collect + Great Expectations + screening as any inbox file
    collect_batch(s, "run-fb")
    res = validate_batch(s, "run-fb", max_quarantine_rate=1.0)
    assert res.accepted == 1, res.reasons
    (snap,) = [r for r in read_jsonl(Path(res.snapshot_path)) if r["id"] == rec["id"]]
    assert snap["answer"] == CORRECTED and snap["provenance"]["trace_id"] == out["trace_id"]


def test_a_correction_gets_no_path_around_validation(shoefix_env):
    """Screening quarantines a correction with a phone number in it, and the holdout-leak check one whose
    question asks a frozen holdout question again."""
    s = shoefix_env
    holdout_q = next(iter_jsonl(sorted((s.data_dir / "holdout").glob("*.jsonl"))))["question"]
    leak_id = served(s, question=holdout_q)
    pii_id = served(s, question="Can mold in shoes make my asthma worse?")
    feedback.submit(s, Correction(leak_id, CORRECTED, source="x", reviewer="r", topic="materials"))
    feedback.submit(s, Correction(pii_id, CORRECTED + " Call me on +1 415 555 0100.", source="x", reviewer="r",
                                  topic="health"))
    collect_batch(s, "run-bad")
    res = validate_batch(s, "run-bad", max_quarantine_rate=1.0)
    assert res.accepted == 0 and sum(res.reasons.values()) == 2, res.reasons
    with ledger.engine_for(s.ledger_url).connect() as conn:
        rows = conn.execute(ledger.records.select().where(ledger.records.c.status == "quarantined")).mappings().all()
    reasons = " ".join(r["reason"] for r in rows)
    assert "holdout" in reasons and "pii" in reasons.lower(), reasons


def test_correction_refuses_what_it_cannot_take(shoefix_env):
    answer_id = served(shoefix_env)
    with pytest.raises(FeedbackError, match="no served answer"):
        feedback.submit(shoefix_env, Correction("0" * 32, CORRECTED, source="x", reviewer="r"))
    for bad in ({"corrected_answer": " "}, {"source": ""}, {"reviewer": " "}, {"topic": "astrology"},
                {"corrected_answer": "x" * 9000}):
        with pytest.raises(FeedbackError):
            Correction(**{"answer_id": answer_id, "corrected_answer": CORRECTED, "source": "s", "reviewer": "r", **bad})
    assert feedback.list_feedback(shoefix_env) == []


def test_correction_while_mlflow_is_down_is_kept_and_attached_later(shoefix_env, monkeypatch):
    import mlflow

    s = shoefix_env
    answer_id = served(s)
    out = feedback.submit(s, Correction(answer_id, CORRECTED, source="x", reviewer="r", topic="materials"))
    assert not out["feedback_logged"] and out["trace_id"] is None and len(feedback.list_feedback(s)) == 1
    answer_log.flush(s)
    assert feedback.attach_pending(s) == 1
    trace_id = answer_log.find_answer(s, answer_id)["trace_id"]
    assert {a.name for a in mlflow.get_trace(trace_id).info.assessments} == {"correct", "expected_response"}
    assert feedback.attach_pending(s) == 0


def test_uncovered_lists_off_corpus_questions_most_asked_first():
    corpus = list(iter_jsonl(sorted((REPO / "data" / "corpus").glob("*.jsonl"))))
    asked = ["What is the capital of France?", "Does baking soda remove shoe odor?",
             "How do I bake sourdough bread?", "what is the capital of  France?",
             "My sneakers smell bad, what can I do?", "Do anti-slip soles lose grip when they get moldy?"]
    rows = uncovered(asked, corpus)
    assert [r["question"] for r in rows] == ["What is the capital of France?", "How do I bake sourdough bread?"]
    assert rows[0]["asked"] == 2 and rows[0]["topic"] == "unknown"
    assert list(by_topic(rows))[0] == "unknown"
    assert uncovered([], corpus) == []


def test_cli_feedback_and_answers(shoefix_env, capsys):
    from shoefix_tasks.ops.cli import main

    s = shoefix_env
    answer_id = served(s, question="What is the best way to sharpen ice skates?")
    assert main(["answers", "flush"]) == 0 and json.loads(capsys.readouterr().out)["sent"] == 1
    assert main(["answers", "uncovered"]) == 0
    assert "sharpen ice skates" in capsys.readouterr().out
    assert main(["feedback", "correct", answer_id, "--answer", CORRECTED, "--source", "x"]) == 0
    assert json.loads(capsys.readouterr().out)["feedback_logged"] is True
    assert main(["feedback", "correct", answer_id, "--source", "x"]) == 2  # no answer: refused, exit 2
    assert "refused: the corrected answer is empty" in capsys.readouterr().err
    assert main(["feedback", "list"]) == 0 and "not collected yet" in capsys.readouterr().out
    collect_batch(s, "run-cli")
    validate_batch(s, "run-cli", max_quarantine_rate=1.0)
    assert main(["feedback", "export"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["intake"]["status"] == "accepted" and row["provenance"]["answer_id"] == answer_id
