"""Benchmark: bad input at scale. (a) an inbox of 100,000 tiny files, good, bad and oddly named;
(b) one 2 GB JSONL file. Each runs collect_qa + validate_qa exactly as the DAG does, against a
fresh SQLite ledger in a temporary folder that is deleted afterwards.

    nice .venv/bin/python benchmarks/bad_input_scale.py [--files 100000] [--gb 2] [--only files|big]
        [--validate-budget-s S]

Prints files/s, records/s, MB/s, wall and CPU seconds and peak RSS per phase (sampled every 50 ms
from /proc), counts by status and reason, and the reconciliation (accepted + quarantined +
deferred = seen, checked against the ledger's own rows). With `--validate-budget-s`, validation
stops after the first chunk that ends past the budget, as a killed worker would: the committed
chunks are measured, the rest stays `collected` (a retry resumes there) and the ledger must still
account for every record. Records are synthesized: questions and ~150-word answers of words
drawn from the real corpus's English vocabulary, so records are distinct (no accidental
near-duplicates), with bad records mixed in at known rates.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ("mechanisms", "materials", "odor", "health", "performance")


class PeakRss:
    """Peak resident memory of this process during a `with` block, sampled from /proc."""

    def __init__(self) -> None:
        self.peak = 0

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))

    def __enter__(self) -> PeakRss:
        self.peak, self._stop = self.now(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.now())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


class Synth:
    """Distinct, valid English records from the corpus vocabulary; `bad(kind)` spoils one."""

    def __init__(self, seed: int = 7) -> None:
        text = " ".join(json.loads(line)["answer"] for p in sorted((ROOT / "data" / "corpus").glob("*.jsonl"))
                        for line in p.read_text().splitlines() if '"lang": "en"' in line)
        self.words = sorted(set(re.findall(r"[a-z]{3,}", text.lower())))
        self.rng = random.Random(seed)

    def sentence(self, n: int) -> str:
        return " ".join(self.rng.choices(self.words, k=n)).capitalize() + "."

    def record(self, k: int) -> dict:
        answer = " ".join(self.sentence(self.rng.randint(12, 20)) for _ in range(9))
        return {"id": f"syn-{k}", "question": f"Case {k}: " + self.sentence(12)[:-1] + "?", "answer": answer,
                "topic": TOPICS[k % 5], "lang": "en", "source": ["bench"]}

    def line(self, k: int, kind: str) -> bytes:
        r = self.record(k)
        if kind == "invalid_json":
            return b'{"id": "broken", "question": \n'
        if kind == "bad_utf8":
            return b'{"id": "x", "question": "\xff\xfe"}\n'
        if kind == "topic":
            r["topic"] = "astrology"
        elif kind == "pii":
            r["answer"] += f" Mail case{k}@example.com for details."
        elif kind == "short":
            r["answer"] = "Too short."
        elif kind == "oversize":
            r["answer"] = "mold " * ((5 << 20) // 5)  # a 5 MB line: quarantined unread into memory
        return json.dumps(r).encode() + b"\n"


BAD_MIX = (("invalid_json", 0.004), ("bad_utf8", 0.002), ("topic", 0.004), ("pii", 0.004), ("short", 0.004))


def pick(rng: random.Random) -> str:
    roll = rng.random()
    for kind, rate in BAD_MIX:
        if roll < rate:
            return kind
        roll -= rate
    return "good"


def make_file_inbox(inbox: Path, n: int, syn: Synth, outside: Path) -> Counter:
    """n tiny files: most hold one good record; some bad records, empty, truncated, CSV, Markdown;
    odd but safe names (unicode, spaces) and unsafe ones (newline, leading dash, bidi override,
    symlink out of the inbox, a FIFO). Returns what was planted, by kind."""
    planted: Counter = Counter()
    rng = random.Random(11)
    secret = outside / "secret.jsonl"
    secret.write_bytes(syn.line(10**9, "good"))
    for i in range(n):
        sub = inbox / f"d{i % 100:02d}"
        sub.mkdir(exist_ok=True)
        roll = rng.random()
        if roll < 0.002:
            name, kind = f"evil\nname-{i}.jsonl", "unsafe_newline"
        elif roll < 0.004:
            name, kind = f"-rf {i}.jsonl", "unsafe_dash"
        elif roll < 0.005:
            name, kind = f"spoof\u202e{i}lnosj.jsonl", "unsafe_bidi"
        elif roll < 0.006:
            os.symlink(secret, sub / f"link-{i}.jsonl")
            planted["unsafe_symlink"] += 1
            continue
        elif roll < 0.0062:
            os.mkfifo(sub / f"pipe-{i}.jsonl")
            planted["unsafe_fifo"] += 1
            continue
        elif roll < 0.02:
            name, kind = f"鞋子 週報 {i}.jsonl", "odd_but_safe"
        elif roll < 0.025:
            (sub / f"empty-{i}.jsonl").write_bytes(b"")
            planted["empty"] += 1
            continue
        elif roll < 0.03:
            (sub / f"partial-{i}.jsonl").write_bytes(syn.line(i, "good")[:-40])
            planted["truncated"] += 1
            continue
        elif roll < 0.035:
            r = syn.record(i)
            (sub / f"r-{i}.csv").write_text(f'id,question,answer,topic,lang\r\n{r["id"]},"{r["question"]}",'
                                             f'"{r["answer"]}",{r["topic"]},en\r\n')
            planted["csv"] += 1
            continue
        elif roll < 0.04:
            r = syn.record(i)
            (sub / f"r-{i}.md").write_text(f"Q: {r['question']}\nA: {r['answer']}\ntopic: {r['topic']}\n"
                                           f"lang: en\nid: {r['id']}\n")
            planted["markdown"] += 1
            continue
        else:
            name, kind = f"r-{i}.jsonl", pick(rng)
        (sub / name).write_bytes(syn.line(i, kind if not kind.startswith(("unsafe", "odd")) else "good"))
        planted[kind] += 1
    return planted


def make_big_file(path: Path, gb: float, syn: Synth) -> tuple[int, Counter]:
    rng = random.Random(13)
    target, size, k = int(gb * (1 << 30)), 0, 0
    planted: Counter = Counter()
    with open(path, "wb", buffering=1 << 22) as fh:
        while size < target:
            kind = "oversize" if k % 400_000 == 1 else pick(rng)
            data = syn.line(k, kind)
            fh.write(data)
            size += len(data)
            planted[kind] += 1
            k += 1
    return size, planted


class OutOfBudget(Exception):
    pass


def cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run(label: str, home: Path, n_files: int, n_bytes: int, planted: Counter, budget_s: float | None) -> None:
    from shoefix_tasks.config import Settings
    from shoefix_tasks.intake import validate
    from shoefix_tasks.intake.collect import collect_batch
    from shoefix_tasks.store import ledger

    s = Settings.from_env()
    inbox_before = sum(1 for _ in (home / "inbox").rglob("*"))
    with PeakRss() as m1:
        t0, c0 = time.perf_counter(), cpu()
        ref = collect_batch(s, label)
        t1, c1 = time.perf_counter(), cpu()
    real_commit = validate._commit_chunk

    def commit_within_budget(*args):
        real_commit(*args)
        if budget_s is not None and time.perf_counter() - t1 > budget_s:
            raise OutOfBudget

    validate._commit_chunk = commit_within_budget
    res = None
    with PeakRss() as m2:
        try:
            res = validate.validate_batch(s, label, max_quarantine_rate=1.0)
        except OutOfBudget:
            pass
        t2, c2 = time.perf_counter(), cpu()
    validate._commit_chunk = real_commit
    engine = ledger.engine_for(s.ledger_url)
    in_ledger = ledger.status_counts(engine, label)
    done = in_ledger.get("accepted", 0) + in_ledger.get("quarantined", 0) - ref.quarantined
    mb = n_bytes / (1 << 20)
    print(f"\n== {label}: {n_files:,} file(s), {mb:,.0f} MiB ==")
    print(f"planted             {dict(sorted(planted.items()))}")
    print(f"files ledgered      {ref.files:>12,}")
    print(f"records seen        {ref.seen:>12,}")
    print(f"collect             {t1 - t0:>9.1f} s wall {c1 - c0:>8.1f} s CPU  {ref.files / (t1 - t0):>9,.0f} files/s"
          f"  {ref.seen / (t1 - t0):>9,.0f} records/s  {mb / (t1 - t0):>7,.1f} MiB/s  peak RSS {m1.peak / 2**20:,.0f} MiB")
    print(f"validate            {t2 - t1:>9.1f} s wall {c2 - c1:>8.1f} s CPU  {done:>9,} records validated"
          f"  {done / (t2 - t1):>9,.0f} records/s  peak RSS {m2.peak / 2**20:,.0f} MiB"
          + ("" if res else f"  (stopped at the {budget_s:.0f} s budget: the rest stays `collected`)"))
    print(f"status (ledger)     {in_ledger}")
    print(f"quarantine reasons  {res.reasons if res else ledger.quarantine_reasons(engine, label)}")
    total = sum(in_ledger.values())
    ok = total == ref.seen and (res is None or res.accepted + res.quarantined + res.deferred == res.seen == total)
    print(f"reconciles          {ok}: " + " + ".join(f"{n:,} {k}" for k, n in sorted(in_ledger.items()))
          + f" = {total:,} = {ref.seen:,} seen")
    inbox_after = sum(1 for _ in (home / "inbox").rglob("*"))
    print(f"inbox entries       {inbox_before:,} before, {inbox_after:,} after; "
          f"peak RSS of the process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")
    assert ok and inbox_before == inbox_after


def fresh_home(tag: str) -> Path:
    home = Path(tempfile.mkdtemp(prefix=f"shoefix-scale-{tag}-"))
    (home / "inbox").mkdir()
    os.environ.update(SHOEFIX_HOME=str(home), MLFLOW_TRACKING_URI=f"sqlite:///{home}/mlflow.db")
    os.environ.pop("SHOEFIX_INBOX", None)
    os.environ.pop("SHOEFIX_LEDGER_URL", None)
    return home


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--only", choices=["files", "big"])
    ap.add_argument("--validate-budget-s", type=float, help="stop validation after this many seconds")
    args = ap.parse_args()
    syn = Synth()
    if args.only in (None, "files"):
        home = fresh_home("files")
        outside = Path(tempfile.mkdtemp(prefix="shoefix-outside-"))
        try:
            t = time.perf_counter()
            planted = make_file_inbox(home / "inbox", args.files, syn, outside)
            size = sum(p.stat().st_size for p in (home / "inbox").rglob("*") if p.is_file() and not p.is_symlink())
            print(f"generated {args.files:,} files in {time.perf_counter() - t:.0f} s")
            run("files", home, args.files, size, planted, args.validate_budget_s)
        finally:
            shutil.rmtree(home, ignore_errors=True)
            shutil.rmtree(outside, ignore_errors=True)
    if args.only in (None, "big"):
        home = fresh_home("big")
        try:
            t = time.perf_counter()
            size, planted = make_big_file(home / "inbox" / "huge.jsonl", args.gb, syn)
            print(f"generated {size / 2**30:.2f} GiB in {time.perf_counter() - t:.0f} s")
            run("big", home, 1, size, planted, args.validate_budget_s)
        finally:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
