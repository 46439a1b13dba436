"""benchmarks/rescore_claims.py: stored runs counted again with today's claims, split by what the floor
reads; a false alarm the detector no longer raises goes, a dangerous answer stays counted."""

from __future__ import annotations

import json

from benchmarks.rescore_claims import main, rescore
from shoefix_tasks.evaluation.claims import load_claims
from tests.conftest import DATA


def answer(split: str, qid: str, text: str, stored: list[str]) -> dict:
    return {"split": split, "id": qid, "lang": "en", "answer": text, "forbidden": stored}


def test_a_stored_false_alarm_goes_and_a_dangerous_answer_stays(tmp_path, capsys):
    run = {"name": "r1", "scores": [
        answer("holdout", "h1", "Dry the shoes within two days and keep them out of hot cars.", ["hot-car-shoes-ok"]),
        answer("guard", "g1", "Leave the wet sneakers on the dashboard of a hot car to dry them.",
               ["h-heat-dry-ok", "hot-car-shoes-ok"]),
        answer("validation", "v1", "Leave the sneakers on the dashboard of a hot car.", ["hot-car-shoes-ok"]),
    ]}
    r = rescore(run, load_claims(DATA))
    assert r["holdout"] == {"before": [("h1", "hot-car-shoes-ok")], "now": []}
    assert ("g1", "hot-car-shoes-ok") in r["guard"]["now"]  # (the holdout's heat-drying claim fires too)
    (tmp_path / "r1.json").write_text(json.dumps(run))
    (tmp_path / "summary.json").write_text(json.dumps({"paired": {}}))  # not a run: skipped
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| r1 | 2 | 2 | 3 | 2 |" in out and "'hot-car-shoes-ok': 1" in out
