"""The GPU `safety` comparison (benchmarks/real_weights/safety.py): `without` drops exactly the safety batch of
data/CHANGES.md and nothing else, and the table counts each variant's forbidden guard claims per seed, so
a variant whose runs state more of them reads worse however its holdout scores."""

from __future__ import annotations

import json
import re

from benchmarks.real_weights.common import sign_flip_p, summarize
from benchmarks.real_weights.safety import SAFETY_BATCH, safety_runs, safety_table, safety_training_rows
from shoefix_tasks.records import iter_jsonl
from tests.conftest import DATA

METRICS = ("composite", "completeness", "key_data_accuracy", "semantic_consistency", "readability", "relevance")


def test_without_drops_the_safety_batch_named_in_changes_and_nothing_else():
    rows = list(iter_jsonl(sorted((DATA / "corpus").glob("*.jsonl"))))
    batch = {r["qid"] for r in rows if r["created"] == SAFETY_BATCH}
    section = (DATA / "CHANGES.md").read_text().split(f"## {SAFETY_BATCH} — ")[1].split("\n## ")[0]
    assert batch == set(re.findall(r"^\| ([a-z]+-\d{3}) \|", section, re.M))
    without = safety_training_rows(rows, "without")
    assert len(without) == len(rows) - 2 * len(batch)  # both languages of each question
    assert not {r["qid"] for r in without} & batch
    assert safety_training_rows(rows, "with") == rows


def run(name: str, forbidden: int, holdout: float) -> dict:
    sc = [{"split": split, "id": f"{split}-{i}", **dict.fromkeys(METRICS, holdout if split == "holdout" else 1.0),
           "forbidden": ["bleach-mix-ok"] if split == "guard" and i < forbidden else [],
           "must_state_stated": [], "must_state_missed": ["never-mix-bleach"]} for split in ("holdout", "guard")
          for i in range(4)]
    variant, seed = name.rsplit("-s", 1)
    return {"name": name, "variant": variant, "seed": int(seed), "records": 1, "final_loss": 1.0,
            **summarize(sc, None), "scores": sc}


def test_the_table_counts_forbidden_claims_per_seed(tmp_path):
    (tmp_path / "safety").mkdir()
    # `without` scores better on the holdout but states more forbidden claims: the table must say so
    for r in (run("with-s1", 0, 2.0), run("with-s2", 1, 2.0), run("without-s1", 3, 3.0), run("without-s2", 2, 3.0)):
        (tmp_path / "safety" / f"{r['name']}.json").write_text(json.dumps(r))
    table = safety_table(tmp_path)["safety"]
    assert table["with"]["guard_forbidden"] == [0, 1] and table["with"]["runs_with_zero"] == 1
    assert table["without"]["guard_forbidden"] == [3, 2] and table["without"]["runs_with_zero"] == 0
    assert table["with"]["guard_forbidden_mean"] < table["without"]["guard_forbidden_mean"]
    assert table["without"]["holdout_composite_mean"] > table["with"]["holdout_composite_mean"]
    assert table["with"]["claims_stated"] == ["bleach-mix-ok"]


def test_every_run_is_a_variant_and_a_seed():
    runs = safety_runs()
    assert runs[0] == "base" and len(runs) == len(set(runs))
    pairs = {}
    for r in runs[1:]:
        variant, seed = r.rsplit("-s", 1)
        pairs.setdefault(int(seed), set()).add(variant)
    assert all(v == {"with", "without"} for v in pairs.values()), pairs  # every seed run both ways
    assert len(pairs) >= 2  # one pair is no comparison (safety_paired returns nothing)


def test_the_sign_flip_p_is_exact():
    assert sign_flip_p([-1.0] * 8) == 2 / 256  # all eight lower: only all-minus and all-plus are as extreme
    assert sign_flip_p([1.0, -1.0] * 4) == 1.0  # no mean difference at all
    # sums of ±3 ±2 ±1 ±1 at least 5 from zero: ±7 and four ways to ±5, so 6 of 16
    assert sign_flip_p([-3.0, -2.0, -1.0, 1.0]) == 6 / 16


def test_the_paired_comparison_reads_the_floor_on_all_answers(tmp_path):
    (tmp_path / "safety").mkdir()
    for r in (run("with-s1", 0, 2.0), run("with-s2", 1, 2.0), run("without-s1", 3, 3.0), run("without-s2", 2, 3.0)):
        (tmp_path / "safety" / f"{r['name']}.json").write_text(json.dumps(r))
    paired = safety_table(tmp_path)["safety"]["paired"]
    floor = paired["forbidden claims, guard + holdout answers (what the gate's floor reads)"]
    assert floor["with"] == [0, 1] and floor["without"] == [3, 2] and floor["mean_diff"] == -2.0
    assert floor["with_lower"] == 2 and floor["p"] == 0.5  # two seeds cannot show more than that
    assert paired["holdout composite"]["mean_diff"] == -1.0  # and with scores lower on the holdout here


def test_only_seeds_run_both_ways_are_paired(tmp_path):
    (tmp_path / "safety").mkdir()
    for r in (run("with-s1", 0, 2.0), run("without-s1", 3, 3.0), run("with-s2", 1, 2.0), run("without-s2", 2, 3.0),
              run("with-s3", 4, 2.0)):  # seed 3 has no `without` partner (a worker that failed)
        (tmp_path / "safety" / f"{r['name']}.json").write_text(json.dumps(r))
    paired = safety_table(tmp_path)["safety"]["paired"]
    assert paired["forbidden claims, guard"]["with"] == [0, 1]  # seeds 1 and 2 only
    (tmp_path / "safety" / "without-s2.json").unlink()
    assert safety_table(tmp_path)["safety"]["paired"] == {}  # one pair is no comparison


def test_final_refuses_before_training_where_its_evaluation_cannot_run(monkeypatch, tmp_path):
    import importlib.util

    import pytest

    from benchmarks import gpu_real_weights
    from benchmarks.real_weights import sweep

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    monkeypatch.setattr(sweep, "trainer_cli", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(SystemExit, match="llama-cpp-python is not installed"):
        gpu_real_weights.main(["final", "--recipes", "smollm2-135m-gpu", "--work", str(tmp_path), "--device", "cpu"])
