"""The forbidden claims of stored GPU runs, counted again with the claims as they are now.

Why: every run JSON under docs/gpu-logs keeps its answers, and the counts in docs/quality.md were made
with the detector of their day. When a detector fix removes false alarms (or adds catches), this shows
what it changes, run by run, without training anything:

    python benchmarks/rescore_claims.py docs/gpu-logs/2026-12-07-h100-session11/qforms

Counted as the gate's floor reads them: guard and holdout answers (a run's validation answers are left out).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.real_weights.common import FLOOR_SPLITS  # noqa: E402  (the folder above on the path first)


def rescore(run: dict, claims: dict) -> dict:
    """Per split of the floor: the (question, claim) pairs stored with the run and those stated now."""
    from shoefix_tasks.evaluation.claims import forbidden

    out = {}
    for split in FLOOR_SPLITS:
        answers = [s for s in run["scores"] if s["split"] == split]
        out[split] = {
            "before": sorted((s["id"], c) for s in answers for c in s["forbidden"]),
            "now": sorted((s["id"], h.claim) for s in answers for h in forbidden(s["answer"], s["lang"], claims)),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    from shoefix_tasks.evaluation.claims import load_claims

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", type=Path, help="folders of run JSONs (each with its scored answers)")
    p.add_argument("--data", type=Path, default=REPO / "data")
    args = p.parse_args(argv)
    claims = load_claims(args.data)
    gone, new = Counter(), Counter()
    print("| run | guard: stored | now | guard + holdout: stored | now |")
    print("|---|---|---|---|---|")
    for path in sorted(f for d in args.dirs for f in d.glob("*.json")):
        run = json.loads(path.read_text())
        if "scores" not in run:
            continue
        r = rescore(run, claims)
        both = {k: r["guard"][k] + r["holdout"][k] for k in ("before", "now")}
        gone.update(c for _, c in set(both["before"]) - set(both["now"]))
        new.update(c for _, c in set(both["now"]) - set(both["before"]))
        print(f"| {run.get('name', path.stem)} | {len(r['guard']['before'])} | {len(r['guard']['now'])} "
              f"| {len(both['before'])} | {len(both['now'])} |")
    print(f"\nno longer stated, by claim: {dict(gone.most_common())}")
    print(f"newly stated, by claim: {dict(new.most_common())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
