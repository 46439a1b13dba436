"""Eight concurrent urgent updates through the Airflow REST API of the native full stack.

Each trigger names its own inbox file of distinct synthetic Q&A and asks for a quick gate; all are
POSTed at once from eight threads. Checked, not just timed:
- serialized: `max_active_runs=1` means no two runs' [start, end] overlap;
- nothing lost: every POST got a run, every run succeeded, each file was ledgered exactly once
  and by the run that named it, one registry version per run that trained;
- exactly one champion at the end, and it is the last entry of the champion history.

    python benchmarks/concurrent_urgent.py                 # starts a stack under a temp dir, stops it
    python benchmarks/concurrent_urgent.py --state var/stack --keep   # reuse / keep a running one

Figures (printed): queue wait and run time per run, the serialized total, triggers/s accepted.

The stack runs with a TEST-ONLY policy (SHOEFIX_POLICY = STATE/policy.yaml: the lenient gate of
tests/fixtures/policy/lenient.yaml, so the random tiny model can become champion, and STATE/recipes
as a recipe folder); triggers name the recipe `bench`. Both are written before the stack starts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("SHOEFIX_DATA_DIR", str(ROOT / "tests" / "fixtures" / "data"))

from tests.stack.conftest import TEST_SETTINGS, Stack, _stack_env  # noqa: E402

URGENT = "shoefix_urgent_update"


def synth_file(path: Path, k: int, n: int, rng: random.Random, words: list[str]) -> None:
    def sentence(m: int) -> str:
        return " ".join(rng.choices(words, k=m)).capitalize() + "."

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for i in range(n):
            rec = {"id": f"bench-{k}-{i}", "question": f"Urgent case {k}.{i}: " + sentence(10)[:-1] + "?",
                   "answer": " ".join(sentence(rng.randint(12, 18)) for _ in range(6)),
                   "topic": ("mechanisms", "materials", "odor", "health", "performance")[i % 5], "lang": "en"}
            fh.write(json.dumps(rec) + "\n")


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--records", type=int, default=6, help="distinct records per urgent file")
    ap.add_argument("--state", type=Path, help="stack state dir (started if not running)")
    ap.add_argument("--keep", action="store_true", help="leave the stack running")
    args = ap.parse_args()

    import re

    import mlflow
    import sqlalchemy as sa

    from shoefix_tasks.store import ledger
    from tests.conftest import build_tiny_model, write_policy, write_tiny_recipe

    state = (args.state or Path(tempfile.mkdtemp(prefix="shoefix-bench-"))).resolve()
    # the recipe and the test-only policy exist before any service reads them (the DAGs' recipe enum);
    # a high learning rate so that two steps on a few records change the random model's greedy
    # answers: otherwise every challenger ties its champion and no run ever promotes
    model = build_tiny_model(state / "models" / "tiny-llama")
    write_tiny_recipe(state / "recipes", model, name="bench", num_train_epochs=1, learning_rate=5e-2)
    policy = write_policy(state / "policy.yaml", [state / "recipes"])  # lenient gate: tests/fixtures/policy
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW_"))}, **TEST_SETTINGS,
           "SHOEFIX_HOME": str(state / "shoefix"), "SHOEFIX_POLICY": str(policy)}
    t0 = time.monotonic()
    if not (state / "pids" / "api-server.pid").exists():
        subprocess.run(["bash", str(ROOT / "scripts" / "stack.sh"), "start", str(state)], env=env, check=True)
    print(f"stack ready in {time.monotonic() - t0:.0f} s ({state})")
    stack = Stack(state, _stack_env(state))
    try:
        text = " ".join(json.loads(ln)["answer"] for ln in (ROOT / "tests/fixtures/corpus_small.jsonl").open())
        words = sorted(set(re.findall(r"[a-z]{3,}", text.lower())))
        rng = random.Random(11)
        stamp = int(time.time())
        names = [f"urgent/bench-{stamp}-{k}.jsonl" for k in range(args.runs)]
        for k, name in enumerate(names):
            synth_file(state / "shoefix" / "inbox" / name, k, args.records, rng, words)
        stack.wait_for_dag(URGENT)

        def trigger(name: str) -> tuple[str, str, float]:
            started = time.monotonic()
            conf = {"reason": f"benchmark: concurrent urgent {name}", "files": [name], "evaluation": "quick",
                    "recipe": "bench"}
            resp = stack.rest("POST", f"/dags/{URGENT}/dagRuns", json={"logical_date": None, "conf": conf})
            assert resp.status_code == 200, resp.text
            return name, resp.json()["dag_run_id"], time.monotonic() - started

        stack.token()
        t_post = time.monotonic()
        with ThreadPoolExecutor(args.runs) as pool:
            posted = list(pool.map(trigger, names))
        post_s = time.monotonic() - t_post
        by_run = {run_id: name for name, run_id, _ in posted}
        assert len(by_run) == args.runs, "two triggers got the same run"
        for run_id in by_run:
            stack.wait_run(URGENT, run_id, timeout_s=3600)
        runs = [stack.rest("GET", f"/dags/{URGENT}/dagRuns/{r}").json() for r in by_run]

        spans = sorted(((ts(r["start_date"]), ts(r["end_date"]), r) for r in runs), key=lambda s: s[0])
        overlaps = sum(1 for a, b in zip(spans, spans[1:], strict=False) if b[0] < a[1])
        engine = ledger.engine_for(stack.env["SHOEFIX_LEDGER_URL"])
        with engine.connect() as c:
            files = c.execute(sa.select(ledger.inbox_files.c.name, ledger.inbox_files.c.batch_id)).all()
            last = c.execute(sa.select(ledger.champion_history.c.version)
                             .order_by(ledger.champion_history.c.event_id.desc()).limit(1)).scalar()
        ledgered = {f.name: f.batch_id for f in files if f.name in set(names)}
        os.environ.update({k: stack.env[k] for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")})
        client = mlflow.MlflowClient(tracking_uri=stack.mlflow, registry_uri=stack.mlflow)
        versions = client.search_model_versions("name='shoefix-expert'")
        mine = [v for v in versions if v.tags.get("pipeline_run") in by_run]
        aliases = client.get_registered_model("shoefix-expert").aliases or {}
        champion_v = int(aliases["champion"]) if "champion" in aliases else None  # one alias: one version at most

        print(f"\n{args.runs} triggers POSTed concurrently in {post_s:.2f} s "
              f"({args.runs / post_s:.1f} triggers/s accepted)")
        print(f"{'run':<48} {'file':<34} {'state':<8} {'wait s':>7} {'run s':>7}")
        first_queued = min(ts(r["queued_at"]) for r in runs)
        for start, end, r in spans:
            print(f"{r['dag_run_id']:<48} {by_run[r['dag_run_id']][-34:]:<34} {r['state']:<8} "
                  f"{start - ts(r['queued_at']):7.1f} {end - start:7.1f}")
        total = spans[-1][1] - first_queued
        print(f"serialized total {total:.0f} s; overlapping runs: {overlaps}; "
              f"all success: {all(r['state'] == 'success' for r in runs)}")
        print(f"files ledgered by the run that named them: "
              f"{sum(ledgered.get(n) == r for r, n in by_run.items())}/{args.runs}")
        print(f"registry versions from these runs: {len(mine)} (distinct runs: {len({v.tags['pipeline_run'] for v in mine})}); "
              f"champion: v{champion_v} (last champion_history entry: v{last})")
        ok = (overlaps == 0 and all(r["state"] == "success" for r in runs)
              and all(ledgered.get(n) == r for r, n in by_run.items())
              and len({v.tags["pipeline_run"] for v in mine}) == len(mine) and last == champion_v)
        print("OK" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        if not args.keep:
            subprocess.run(["bash", str(ROOT / "scripts" / "stack.sh"), "stop", str(state)], env=env)


if __name__ == "__main__":
    sys.exit(main())
