"""The GPU sweep's choice (benchmarks/real_weights/sweep.py `sweep_table`), which `final --from-sweep` trains:
the grid config best on validation wins, fewer epochs break a tie, the holdout never decides, and an extra
config run beside the grid (the bf16-adapter check) is listed but never chosen, even when it scores best,
because `final --from-sweep` applies only epochs, learning rate and rank."""

from __future__ import annotations

import json

from benchmarks.real_weights.common import EXTRA
from benchmarks.real_weights.sweep import sweep_table

METRICS = ("composite", "completeness", "key_data_accuracy", "semantic_consistency", "readability", "relevance")


def scores(validation: float, holdout: float) -> list[dict]:
    def one(split: str, i: int, value: float) -> dict:
        return {"split": split, "id": f"{split}-{i}", **dict.fromkeys(METRICS, value), "forbidden": [],
                "must_state_stated": [], "must_state_missed": []}

    return [one(split, i, value) for split, value in (("validation", validation), ("holdout", holdout),
                                                      ("guard", 1.0)) for i in range(3)]


def row(name: str, epochs: int, validation: float, holdout: float) -> dict:
    from benchmarks.real_weights.common import summarize

    sc = scores(validation, holdout)
    return {"name": name, "epochs": epochs, "lr": 1e-3, "r": 64, "final_loss": 1.0, "train_tokens": 1,
            "train_runtime_s": 1.0, **summarize(sc, None), "scores": sc}


def test_the_sweep_chooses_on_validation_and_never_an_extra_config(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    rows = [row("e3-lr0.001-r64", 3, 2.0, 9.0),  # best holdout, worse validation: the holdout must not decide
            row("e8-lr0.001-r64", 8, 2.4, 1.0),
            row("e13-lr0.001-r64", 13, 2.4, 1.0),  # tied on validation, more epochs: loses the tie
            row(EXTRA[0]["name"], 8, 3.0, 3.0)]  # best on both, but not a grid config
    for r in rows:
        (sweep / f"{r['name']}.json").write_text(json.dumps(r))
    table = sweep_table(tmp_path, scores(1.0, 1.0))
    assert table["chosen"] == "e8-lr0.001-r64"
    assert {r["name"] for r in table["rows"]} == {r["name"] for r in rows}  # the extra one is still reported
