"""Two trainer processes on one node: `accelerate launch --num_processes 2` of the same CLI, here on
the CPU (torchrun underneath, gloo), started by the pipeline task exactly as on a multi-GPU node."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shoefix_tasks.model.adapter import verify_adapter
from shoefix_tasks.training.train import last_complete_checkpoint
from tests.conftest import fixture_snapshot


@pytest.mark.slow
def test_two_process_ddp_run_logs_once(shoefix_env, tiny_recipe, monkeypatch):
    import mlflow

    from shoefix_tasks.pipeline import train_adapter

    s = shoefix_env
    snap = str(fixture_snapshot(s))  # as the DAG passes it
    monkeypatch.setenv("SHOEFIX_TRAIN_PROCESSES", "2")
    monkeypatch.setenv("SHOEFIX_TORCH_THREADS", "1")
    out = train_adapter("r1", str(tiny_recipe), snap, ["train.max_steps=4"], settings=s)

    ckpt = last_complete_checkpoint(s.run_dir("r1") / "train")
    assert sorted(p.name for p in ckpt.glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    # 12 records, micro-batch 4 on each of 2 ranks: 8 a step, so epoch 1 ends at step 2 (3 on one process)
    assert state["global_step"] == 4 and state["log_history"][1]["epoch"] == 1.0
    client = mlflow.MlflowClient(tracking_uri=s.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("shoefix").experiment_id],
                              "tags.`shoefix.run_key` = 'r1' and tags.`shoefix.stage` = 'train'")
    assert [r.info.run_id for r in runs] == [out["run_id"]]  # rank 1 never created or logged a run
    assert sorted(m.step for m in client.get_metric_history(out["run_id"], "train/loss")) == [1, 2, 3, 4]
    verify_adapter(Path(out["adapter_dir"]))
