"""Benchmark: ingest and validate a 50,000-record inbox; print records/s and peak memory.

    .venv/bin/python benchmarks/intake_50k.py [--records 50000] [--files 50]

Records are synthesized from the real corpus: each answer is 4 sentences drawn at random from
different corpus answers (so records are distinct, not near-duplicates, as real new Q&A would be),
spread over JSONL files, with ~2% bad rows mixed in (invalid JSON, unknown
topic, PII) so that quarantine paths are exercised too. Runs collect_qa and validate_qa exactly as
the DAG does, against a fresh SQLite ledger in a temporary folder (deleted afterwards).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def synthesize(n: int, n_files: int, inbox: Path) -> int:
    base = [json.loads(line) for p in sorted((ROOT / "data" / "corpus").glob("*.jsonl"))
            for line in p.read_text().splitlines()]
    base = [r for r in base if r["lang"] == "en"]
    sentences = [s.strip() + "." for r in base for s in r["answer"].split(". ") if len(s) > 30]
    rng = random.Random(7)
    words = "mold humidity leather canvas insole odor sweat grip midsole silica ventilation storage".split()
    bad = 0
    per_file = n // n_files
    for f in range(n_files):
        with open(inbox / f"batch-{f:03d}.jsonl", "w") as fh:
            for i in range(per_file):
                k = f * per_file + i
                r = dict(base[k % len(base)])
                tag = " ".join(rng.choice(words) for _ in range(6))
                r["id"] = f"syn-{k}"
                r["question"] = f"Case {k} ({tag}): {r['question']}"
                r["answer"] = " ".join(rng.sample(sentences, 4))
                roll = rng.random()
                if roll < 0.007:
                    fh.write('{"id": "broken", "question": \n')
                    bad += 1
                    continue
                if roll < 0.014:
                    r["topic"] = "astrology"
                    bad += 1
                elif roll < 0.02:
                    r["answer"] += " Contact me at someone@example.com."
                    bad += 1
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=50_000)
    ap.add_argument("--files", type=int, default=50)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="shoefix-bench-"))
    try:
        run(home, args)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def run(home: Path, args: argparse.Namespace) -> None:
    (home / "inbox").mkdir()
    os.environ.update(SHOEFIX_HOME=str(home), MLFLOW_TRACKING_URI=f"sqlite:///{home}/mlflow.db")
    bad = synthesize(args.records, args.files, home / "inbox")

    from shoefix_tasks.config import Settings
    from shoefix_tasks.intake.collect import collect_batch
    from shoefix_tasks.intake.validate import validate_batch

    s = Settings.from_env()
    t0 = time.perf_counter()
    ref = collect_batch(s, "bench")
    t1 = time.perf_counter()
    res = validate_batch(s, "bench", max_quarantine_rate=1.0)
    t2 = time.perf_counter()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"records seen        {ref.seen:>10,}  (synthesized bad rows: {bad})")
    print(f"accepted            {res.accepted:>10,}")
    print(f"quarantined         {res.quarantined:>10,}  {res.reasons}")
    print(f"collect             {t1 - t0:>10.1f} s  {ref.seen / (t1 - t0):>10,.0f} records/s")
    print(f"validate            {t2 - t1:>10.1f} s  {ref.seen / (t2 - t1):>10,.0f} records/s")
    print(f"end to end          {t2 - t0:>10.1f} s  {ref.seen / (t2 - t0):>10,.0f} records/s")
    print(f"peak memory (RSS)   {peak_mb:>10,.0f} MiB")
    assert res.accepted + res.quarantined + res.deferred == res.seen == ref.seen


if __name__ == "__main__":
    main()
