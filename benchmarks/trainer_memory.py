"""Where the CPU trainer's memory goes: peak RSS of `python -m shoefix_tasks.train` per variant.

Each variant is a cold trainer process (the way a DAG task runs it) on the same snapshot for the
same few optimizer steps; peak RSS comes from the kernel (`ru_maxrss` of that one child), step time
from the trainer's own `train_runtime`. Variants change one thing each against the product recipe,
so the table says which knob the memory follows. Ratios only: this machine is shared and noisy.

    python benchmarks/trainer_memory.py [--steps 2] [--recipe default]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

VARIANTS: list[tuple[str, list[str], dict[str, str]]] = [
    ("recipe as is", [], {}),
    ("gradient checkpointing", ["train.gradient_checkpointing=true"], {}),
    ("micro-batch 4 x accumulation 2", ["train.per_device_train_batch_size=4",
                                        "train.gradient_accumulation_steps=2"], {}),
    ("micro-batch 2 x accumulation 4", ["train.per_device_train_batch_size=2",
                                        "train.gradient_accumulation_steps=4"], {}),
    ("malloc: 2 arenas, trim at 64 MiB", [], {"MALLOC_ARENA_MAX": "2", "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}),
]


def snapshot(path: Path) -> Path:
    with open(path, "w") as out:
        for f in sorted((ROOT / "data" / "corpus").glob("*.jsonl")):
            out.write(f.read_text())
    return path


def run_variant(recipe: str, sets: list[str], env_extra: dict[str, str], steps: int, snap: Path,
                home: Path) -> dict:
    out_dir = Path(tempfile.mkdtemp(dir=home))
    args = [sys.executable, "-m", "shoefix_tasks.train", "--recipe", recipe, "--snapshot", str(snap),
            "--run-key", out_dir.name, "--output-dir", str(out_dir), "--set", f"train.max_steps={steps}",
            "--set", f"train.save_steps={steps * 10}"]
    for s in sets:
        args += ["--set", s]
    # ru_maxrss of RUSAGE_CHILDREN is the largest child so far: measure each variant in its own
    # grandchild, through a one-line wrapper that reports its child's peak.
    wrapper = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
               "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env_extra, "SHOEFIX_HOME": str(home),
                               "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db"})
    wall = time.perf_counter() - t0
    peak = next((int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK_KIB")), 0)
    result = next((json.loads(line) for line in reversed(proc.stdout.splitlines()) if line.startswith('{"')), None)
    if proc.returncode != 0 or result is None:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"variant failed (exit {proc.returncode}): {sets} {env_extra}")
    runtime = float(result["train_runtime_s"])
    return {"peak_gib": peak / 2**20, "train_s": runtime, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2,
                    help="optimizer steps per variant (the length-grouped sampler serves the longest batch first)")
    ap.add_argument("--recipe", default="default")
    ap.add_argument("--home", default=os.environ.get("SHOEFIX_HOME", str(ROOT / "var")),
                    help="SHOEFIX_HOME whose models/ holds the converted base (converted there if absent)")
    a = ap.parse_args()
    home = Path(a.home)
    with tempfile.TemporaryDirectory(dir=home) as tmp:
        snap = snapshot(Path(tmp) / "corpus.jsonl")
        rows = []
        for name, sets, env_extra in VARIANTS:
            r = run_variant(a.recipe, sets, env_extra, a.steps, snap, home)
            rows.append((name, r))
            print(f"  {name}: {r['peak_gib']:.2f} GiB peak, {r['train_s']:.0f} s training", flush=True)
    base = rows[0][1]
    print(f"\nrecipe {a.recipe!r}, {a.steps} optimizer steps per variant, one cold trainer process each")
    print(f"{'variant':36s} {'peak RSS GiB':>12s} {'vs recipe':>9s} {'train s':>8s} {'vs recipe':>9s}")
    for name, r in rows:
        print(f"{name:36s} {r['peak_gib']:12.2f} {r['peak_gib'] / base['peak_gib']:9.2f} "
              f"{r['train_s']:8.0f} {r['train_s'] / max(base['train_s'], 1e-9):9.2f}")


if __name__ == "__main__":
    main()
