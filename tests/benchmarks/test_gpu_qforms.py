"""The GPU `qforms` comparison (benchmarks/real_weights/qforms.py): `forms` adds the question forms of the
training split's records and nothing else (no validation question comes in through its forms), and the
table pairs the runs by seed on the validation split, the measure that decides."""

from __future__ import annotations

import json

import pytest

from benchmarks.real_weights.common import split_corpus, summarize
from benchmarks.real_weights.qforms import (
    HEARSAY,
    PHRASINGS_FILE,
    QFORMS_EPOCHS,
    QFORMS_FILE,
    qforms_config,
    qforms_runs,
    qforms_table,
    with_question_forms,
)
from tests.conftest import DATA

METRICS = ("composite", "completeness", "key_data_accuracy", "semantic_consistency", "readability", "relevance")


def test_forms_add_other_questions_to_the_training_answers_only():
    train, val = split_corpus(DATA)
    rows = with_question_forms(train, DATA / QFORMS_FILE)
    assert rows[:len(train)] == train
    added = rows[len(train):]
    assert len(added) == 2 * len(train)  # every training answer has two forms
    by_id = {r["id"]: r for r in train}
    for r in added:
        src = by_id[r["id"].rsplit("-f", 1)[0]]
        assert r["question"] != src["question"]
        assert {k: v for k, v in r.items() if k not in ("id", "question")} == {
            k: v for k, v in src.items() if k not in ("id", "question")}
    assert len({r["id"] for r in rows}) == len(rows)
    # the whole corpus would bring the validation questions in under their forms: the split keeps them out
    every = with_question_forms(train + val, DATA / QFORMS_FILE)
    assert {r["qid"] for r in val} <= {r["qid"] for r in every[len(train + val):]}


def test_forms_of_a_record_left_out_stay_out(tmp_path):
    forms = tmp_path / "forms.jsonl"
    forms.write_text(json.dumps({"id": "a-en", "questions": ["q1", "q2"]}) + "\n"
                     + json.dumps({"id": "b-en", "questions": ["q3"]}) + "\n")
    rows = [{"id": "b-en", "qid": "b", "question": "q", "answer": "x"}]
    assert [r["question"] for r in with_question_forms(rows, forms)] == ["q", "q3"]


def test_para_gives_each_form_its_own_wording_of_the_answer(tmp_path):
    forms, worded = tmp_path / "forms.jsonl", tmp_path / "worded.jsonl"
    forms.write_text(json.dumps({"id": "a-en", "questions": ["q1", "q2"]}) + "\n"
                     + json.dumps({"id": "b-en", "questions": ["q3", "q4"]}) + "\n")
    worded.write_text(json.dumps({"id": "a-en", "answers": ["a1", "a2"]}) + "\n"
                      + json.dumps({"id": "b-en", "answers": ["b1", "b2"]}) + "\n")
    rows = [{"id": "b-en", "qid": "b", "question": "q", "answer": "x", "key_facts": ["k"]}]
    para = with_question_forms(rows, forms, phrasings_file=worded)
    assert [(r["question"], r["answer"]) for r in para] == [("q", "x"), ("q3", "b1"), ("q4", "b2")]
    assert all(r["key_facts"] == ["k"] and r["qid"] == "b" for r in para)


def test_para_trains_the_forms_rows_with_the_shipped_wordings():
    train, _ = split_corpus(DATA)
    forms = with_question_forms(train, DATA / QFORMS_FILE)
    para = with_question_forms(train, DATA / QFORMS_FILE, phrasings_file=DATA / PHRASINGS_FILE)
    assert para[:len(train)] == train and len(para) == len(forms)
    for f, p in zip(forms[len(train):], para[len(train):], strict=True):
        assert {k: v for k, v in f.items() if k != "answer"} == {k: v for k, v in p.items() if k != "answer"}
        assert p["answer"] != f["answer"]
    assert len({r["answer"] for r in para}) == len(para)  # every fact met in three wordings


def test_the_control_leaves_out_the_forms_that_put_a_belief_to_the_expert():
    train, _ = split_corpus(DATA)
    every = with_question_forms(train, DATA / QFORMS_FILE)[len(train):]
    control = with_question_forms(train, DATA / QFORMS_FILE, hearsay=False)[len(train):]
    assert control == [r for r in every if not HEARSAY.search(r["question"])]
    assert 0.7 * len(every) < len(control) < 0.95 * len(every)  # most forms stay: ~15% are hearsay frames
    for q in ("My friend says bleach is best. Is that right?", "Is it true that mothballs keep mold off boots?",
              "My uncle swears by bleach foot baths.", "I read that mold loves the dark.",
              "A forum post says a night in the freezer wipes out mold.", "Is sodium bicarbonate a myth?"):
        assert HEARSAY.search(q), q
    for q in ("How do I dry soaked leather boots?", "Is mold in old shoes dangerous to touch?",
              "What is pitted keratolysis, and do my shoes need replacing?", "Does baking soda work on smell?",
              "Which sayings about shoes are true?"):  # words that only contain a frame's word
        assert not HEARSAY.search(q), q


def test_every_seed_runs_both_ways():
    runs = qforms_runs()
    assert runs[0] == "base" and len(runs) == len(set(runs))
    pairs: dict[int, set[str]] = {}
    for r in runs[1:]:
        variant, seed = r.rsplit("-s", 1)
        pairs.setdefault(int(seed), set()).add(variant)
    assert all(v == {"forms", "plain"} for v in pairs.values()) and len(pairs) >= 2


def test_run_names_give_kind_epochs_and_seed():
    assert qforms_config("forms-s3") == ("forms", "forms", QFORMS_EPOCHS["forms"], 3)
    assert qforms_config("plain-s42") == ("plain", "plain", QFORMS_EPOCHS["plain"], 42)
    assert qforms_config("forms-e8-s1") == ("forms-e8", "forms", 8, 1)
    assert qforms_config("plain-e24-s2") == ("plain-e24", "plain", 24, 2)
    assert qforms_config("forms-nh-e8-s9") == ("forms-nh-e8", "forms-nh", 8, 9)
    assert qforms_config("para-e8-s10") == ("para-e8", "para", 8, 10)
    with pytest.raises(ValueError):
        qforms_config("with-s1")  # a safety run's name


def run(name: str, val_kda: float, holdout: float, forbidden: int = 0) -> dict:
    sc = [{"split": split, "id": f"{split}-{i}",
           **dict.fromkeys(METRICS, val_kda if split == "validation" else holdout if split == "holdout" else 1.0),
           "forbidden": ["bleach-mix-ok"] if split == "guard" and i < forbidden else [],
           "must_state_stated": [], "must_state_missed": []} for split in ("validation", "holdout", "guard")
          for i in range(4)]
    variant, seed = name.rsplit("-s", 1)
    return {"name": name, "variant": variant, "seed": int(seed), "records": 3, "epochs": 3, "train_tokens": 10,
            "final_loss": 1.0, **summarize(sc, None), "scores": sc}


@pytest.mark.parametrize("better", ["forms", "plain"])
def test_the_table_pairs_by_seed_on_the_validation_split(tmp_path, better):
    """Whichever variant states more validation key data must come out ahead, whatever the holdout says."""
    (tmp_path / "qforms").mkdir()
    good, bad = (2.0, 1.5)
    for seed in (1, 2, 3):
        for variant in ("forms", "plain"):
            kda = good if variant == better else bad
            r = run(f"{variant}-s{seed}", kda, holdout=3.0 if variant != better else 1.0, forbidden=seed)
            (tmp_path / "qforms" / f"{r['name']}.json").write_text(json.dumps(r))
    for seed in (1, 2):  # longer runs: paired among themselves, never with the runs above
        for variant in ("forms-e8", "plain-e24"):
            r = run(f"{variant}-s{seed}", 3.0 if variant.startswith(better) else 2.0, holdout=1.0)
            (tmp_path / "qforms" / f"{r['name']}.json").write_text(json.dumps(r))
    table = qforms_table(tmp_path)["paired"]
    longer = table["forms-e8 vs plain-e24"]["validation key data (the decision)"]
    assert longer["mean_diff"] == (1.0 if better == "forms" else -1.0) and len(longer["forms-e8"]) == 2
    paired = table["forms vs plain"]
    decision = paired["validation key data (the decision)"]
    assert decision["mean_diff"] == (0.5 if better == "forms" else -0.5)
    assert decision["forms_lower"] == (0 if better == "forms" else 3)
    assert paired["holdout key data"]["mean_diff"] == (-2.0 if better == "forms" else 2.0)
    assert paired["forbidden claims, guard + holdout answers (what the gate's floor reads)"]["mean_diff"] == 0


def test_the_device_command_line_runs_from_the_repository_root():
    """How every device call starts it (`python3 benchmarks/gpu_real_weights.py ...` from the root, the
    script's own folder first on the path): the experiments import, and the run list the workers get is the
    module's; the parallel sweep spawns the same file."""
    import subprocess
    import sys

    from benchmarks.real_weights.common import REPO

    out = subprocess.run([sys.executable, "benchmarks/gpu_real_weights.py", "qforms", "--print-runs"], cwd=REPO,
                         capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == qforms_runs()
    assert (REPO / "benchmarks" / "gpu_real_weights.py").is_file()


def test_the_confirmation_pairs_the_gates_floor_by_seed(tmp_path):
    """The eleventh session's decision: forbidden claims over all answers, forms-e8 against plain-e24 on the
    same seeds; the control and the committed recipe paired with forms-e8 beside it."""
    (tmp_path / "qforms").mkdir()
    claims = {"forms-e8": 1, "plain-e24": 4, "forms-nh-e8": 3, "plain": 2}
    for seed in (8, 9, 10):
        for variant, n in claims.items():
            r = run(f"{variant}-s{seed}", 1.0, holdout=1.0, forbidden=n)
            (tmp_path / "qforms" / f"{r['name']}.json").write_text(json.dumps(r))
    table = qforms_table(tmp_path)["paired"]
    floor = "forbidden claims, guard + holdout answers (what the gate's floor reads)"
    assert table["forms-e8 vs plain-e24"][floor]["mean_diff"] == -3
    assert table["forms-e8 vs plain-e24"][floor]["forms-e8_lower"] == 3
    assert table["forms-nh-e8 vs forms-e8"][floor]["mean_diff"] == 2
    assert table["forms-e8 vs plain"][floor]["mean_diff"] == -1
    assert table["forms vs plain"] == {}  # no 3-epoch forms run: nothing to pair


def test_the_wordings_decision_pairs_para_with_forms_on_validation_key_data(tmp_path):
    """The twelfth session's decision: validation key data, para-e8 against forms-e8 on the same seeds."""
    (tmp_path / "qforms").mkdir()
    kda = {"para-e8": 2.5, "forms-e8": 1.5, "plain-e24": 1.0}
    for seed in (1, 8, 9):
        for variant, k in kda.items():
            r = run(f"{variant}-s{seed}", k, holdout=1.0)
            (tmp_path / "qforms" / f"{r['name']}.json").write_text(json.dumps(r))
    table = qforms_table(tmp_path)["paired"]
    decision = "validation key data (the decision)"
    assert table["para-e8 vs forms-e8"][decision]["mean_diff"] == 1.0
    assert table["para-e8 vs forms-e8"][decision]["para-e8_lower"] == 0
    assert table["para-e8 vs plain-e24"][decision]["mean_diff"] == 1.5
