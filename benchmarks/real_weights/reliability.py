"""GPU reliability: preflight, a real CUDA out-of-memory backed off, a killed trainer resumed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.real_weights.common import GPU_RECIPE, finish, log, trainer_cli


def _gpu_hog(leave_gib: float) -> subprocess.Popen:
    """Another process holding all but `leave_gib` of the card's memory (a busy, shared GPU)."""
    code = ("import torch,time,sys\nfree,total=torch.cuda.mem_get_info()\n"
            f"x=torch.empty(int(free-{leave_gib}*2**30),dtype=torch.uint8,device='cuda')\n"
            "print('holding',x.numel()/2**30,'GiB',flush=True)\nsys.stdout.flush()\ntime.sleep(3600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    return proc


def cmd_reliability(args) -> dict[str, Any]:
    from shoefix_tasks.records import iter_jsonl, write_jsonl

    work, data = Path(args.work), Path(args.data)
    rows = [r for r in iter_jsonl(sorted((data / "corpus").glob("*.jsonl"))) if r["lang"] == "en"]
    snapshot = write_jsonl(work / "snapshots" / "corpus-en.jsonl", rows)
    base = [f"--set=model.base_model={args.base}"]
    out: dict[str, Any] = {}

    # 1. preflight: passes on the card; fails (exit 78, before any data is read) while another process holds it
    code, text = finish(trainer_cli(GPU_RECIPE, snapshot, work / "rel" / "pre-ok", "rel-pre-ok", *base,
                                    "--set=train.max_steps=2"), "rel-preflight-ok")
    out["preflight_ok"] = {"exit": code, "line": next((ln for ln in text.splitlines() if "preflight passed" in ln), "")}
    hog = _gpu_hog(0.2)
    try:
        code, text = finish(trainer_cli(GPU_RECIPE, snapshot, work / "rel" / "pre-full", "rel-pre-full", *base),
                            "rel-preflight-full")
    finally:
        hog.kill()
    out["preflight_full_card"] = {"exit": code, "line": next((ln for ln in text.splitlines() if "preflight failed" in ln), "")}

    # 2. a real CUDA OOM: the card mostly taken, a micro-batch too big for what is left
    hog = _gpu_hog(args.oom_leave_gib)
    try:
        code, text = finish(trainer_cli(GPU_RECIPE, snapshot, work / "rel" / "oom", "rel-oom", *base,
                                        "--set=train.per_device_train_batch_size=64", "--set=train.max_length=1024",
                                        "--set=train.num_train_epochs=1"), "rel-oom")
    finally:
        hog.kill()
    backoff = work / "rel" / "oom" / "oom_backoff.json"
    out["oom"] = {"exit": code, "backoff": json.loads(backoff.read_text()) if backoff.is_file() else None,
                  "lines": [ln for ln in text.splitlines() if "out of memory" in ln.lower()][:6]}

    # 3. killed mid-run (SIGKILL: no checkpoint of its own), then the same command resumes
    proc = trainer_cli(GPU_RECIPE, snapshot, work / "rel" / "kill", "rel-kill", *base, "--set=train.save_steps=5",
                       "--set=train.num_train_epochs=3")
    deadline = time.time() + 300
    while time.time() < deadline and not (work / "rel" / "kill" / "checkpoint-10" / "trainer_state.json").is_file():
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    finish(proc, "rel-kill-first")
    before = sorted(p.name for p in (work / "rel" / "kill").glob("checkpoint-*"))
    code, text = finish(trainer_cli(GPU_RECIPE, snapshot, work / "rel" / "kill", "rel-kill", *base,
                                    "--set=train.save_steps=5", "--set=train.num_train_epochs=3"), "rel-kill-resume")
    out["kill_resume"] = {"exit": code, "resumed": [ln for ln in text.splitlines() if "resuming from" in ln][:2],
                          "checkpoints_when_killed": before,
                          "checkpoints_after_resume": sorted(p.name for p in (work / "rel" / "kill").glob("checkpoint-*"))}
    log(json.dumps(out, indent=1))
    return {"reliability": out}
