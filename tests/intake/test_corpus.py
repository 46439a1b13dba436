"""The expert corpus itself: the GX intake suite on the real files, plus the corpus' own rules."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from shoefix_tasks.config import LANGS, TOPICS
from shoefix_tasks.evaluation.metrics import content_units, text_length
from shoefix_tasks.intake.validate import build_frame, run_suite
from shoefix_tasks.records import question_key
from tests.conftest import DATA


def load(kind: str) -> list[dict]:
    return [json.loads(line) for p in sorted((DATA / kind).glob("*.jsonl")) for line in p.read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus():
    return load("corpus")


@pytest.mark.parametrize("kind", ["corpus", "holdout", "guard"])
def test_gx_intake_suite_passes_on_shipped_data(kind):
    rows = load(kind)
    assert run_suite(build_frame(rows))[0] == {}


def test_size_and_topic_balance(corpus):
    assert len(corpus) >= 400
    assert len({r["qid"] for r in corpus}) >= 200
    topics = Counter(r["topic"] for r in corpus)
    assert set(topics) == set(TOPICS)
    assert all(n / len(corpus) >= 0.15 for n in topics.values()), topics


@pytest.mark.parametrize("kind", ["corpus", "holdout", "guard"])
def test_records_are_complete_and_paired(kind):
    rows = load(kind)
    assert len({r["id"] for r in rows}) == len(rows)
    by_qid: dict[str, set] = {}
    for r in rows:
        for f in ("id", "qid", "question", "answer", "topic", "lang", "source", "contributor", "created",
                  "key_points", "key_facts"):
            assert r.get(f), (r["id"], f)
        assert r["lang"] in LANGS
        by_qid.setdefault(r["qid"], set()).add(r["lang"])
        for fact in r["key_facts"]:
            assert fact in r["answer"], (r["id"], fact)
        n = text_length(r["answer"])
        if r["lang"] == "en":
            assert 60 <= n <= 250, (r["id"], n)
        else:
            assert 120 <= len(re.findall(r"[\u3400-\u9fff]", r["answer"])) <= 450, r["id"]
    assert all(langs == set(LANGS) for langs in by_qid.values())


def test_holdout_and_guard_are_frozen_apart_from_training(corpus):
    holdout, guard = load("holdout"), load("guard")
    assert len(holdout) >= 80 and {r["topic"] for r in holdout} == set(TOPICS)
    assert {r["lang"] for r in holdout} == set(LANGS) and len(guard) >= 10
    train_q = {question_key(r["question"]) for r in corpus}
    assert not train_q & {question_key(r["question"]) for r in holdout + guard}
    # no near-duplicate questions either: content-unit Jaccard stays well below paraphrase level
    train_sets = [set(content_units(r["question"])) for r in corpus]
    for r in holdout + guard:
        units = set(content_units(r["question"]))
        worst = max(len(units & t) / len(units | t) for t in train_sets)
        assert worst < 0.6, (r["id"], worst)


def test_every_source_key_is_documented(corpus):
    documented = set(re.findall(r"\*\*\[([A-Z0-9-]+)\]\*\*", (DATA / "SOURCES.md").read_text()))
    used = {k for r in corpus + load("holdout") + load("guard") for k in r["source"]}
    assert used <= documented, used - documented


def test_languages_agree_on_numbers(corpus):
    """The en and zh-TW versions of a question state the same figures."""
    nums = re.compile(r"\d+(?:\.\d+)?")
    by_qid: dict[str, dict] = {}
    for r in corpus:
        by_qid.setdefault(r["qid"], {})[r["lang"]] = set(nums.findall(r["answer"]))
    disagree = [q for q, v in by_qid.items() if v["en"] != v["zh-TW"]]
    assert len(disagree) <= 0.05 * len(by_qid), disagree[:10]


def test_frozen_sets_match_their_recorded_hashes():
    from shoefix_tasks.records import load_eval_set, rows_hash

    recorded = {}
    for line in (DATA / "FROZEN.sha256").read_text().splitlines():
        if line and not line.startswith("#"):
            kind, digest, n = line.split()
            recorded[kind] = (digest, int(n))
    for kind in ("holdout", "guard"):
        rows = load_eval_set(DATA, kind)
        assert (rows_hash(rows), len(rows)) == recorded[kind], f"{kind} changed without updating FROZEN.sha256"
