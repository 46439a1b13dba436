"""The seed-shaped scorecard: a table (before / after / change) and a chart, from evaluation.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROWS = [  # (key in summary, seed's name, label, higher is better)
    ("completeness", "內容完整性", "content completeness (1-10)", True),
    ("key_data_accuracy", "關鍵數據準確度", "key-data accuracy (1-10)", True),
    ("semantic_consistency", "語意一致性", "semantic consistency (1-10)", True),
    ("readability", "答案可讀性", "answer readability (1-10)", True),
    ("latency_p50_s", "回應時間", "response time p50 (s)", False),
]
EXTRA = [("composite", "composite (1-10)"), ("relevance", "relevance (0-1)"),
         ("forbidden_claims", "forbidden claims stated"), ("must_state_coverage", "required safety claims stated"),
         ("latency_p95_s", "response time p95 (s)"), ("latency_tokens_per_s", "tokens/s (batch 1)"),
         ("answer_length_words", "answer length (words)")]
LATENCY_KEYS = ("latency_p50_s", "latency_p95_s", "latency_tokens_per_s")


def _change(before: float, after: float) -> str:
    return f"{(after - before) / before * 100:+.0f}%" if before else "n/a"


def scorecard_rows(evaluation: dict[str, Any]) -> list[tuple[str, float, float, str]]:
    """(name, before, after, change). Latency changes are shown only where the two models could
    differ in speed; otherwise the difference is noise and the change column says so."""
    before, after = evaluation["champion"]["summary"], evaluation["challenger"]["summary"]
    compared = evaluation.get("latency", {}).get("compared", True)

    def change(k: str) -> str:
        return "not compared" if k in LATENCY_KEYS and not compared else _change(before.get(k, 0), after.get(k, 0))

    rows = [(f"{label} {seed}", before[k], after[k], change(k)) for k, seed, label, _ in ROWS]
    rows += [(label, before.get(k, 0), after.get(k, 0), change(k)) for k, label in EXTRA]
    return rows


def notes(evaluation: dict[str, Any]) -> list[str]:
    """The scorecard's footnotes: languages, latency verdict with the spread, forbidden claims."""
    out = []
    if evaluation.get("language_note"):
        note = evaluation["language_note"]
        out.append(note[:1].upper() + note[1:] + ".")
    lat = evaluation.get("latency")
    if lat:
        spread = "; ".join(f"{evaluation[w]['label']} p50 {evaluation[w]['summary']['latency_p50_s']:.2f} s "
                           f"(IQR {evaluation[w]['summary'].get('latency_p25_s', 0):.2f}-"
                           f"{evaluation[w]['summary'].get('latency_p75_s', 0):.2f} s, "
                           f"n {evaluation[w]['summary'].get('latency_n', 0)})" for w in ("champion", "challenger"))
        why = lat["why"]
        out.append(f"Latency, interleaved: {spread}. {why[:1].upper() + why[1:]}.")
    for who in ("champion", "challenger"):
        for s in evaluation[who]["scores"]:
            for f in s.get("forbidden", []):
                out.append(f"{evaluation[who]['label']} states forbidden claim `{f['claim']}` on {s['id']}: "
                           f"\"{f['sentence'][:160]}\"")
    return out


def scorecard_markdown(evaluation: dict[str, Any], decision: dict[str, Any] | None = None) -> str:
    champ = evaluation["champion"]["label"]
    lines = [f"| metric | {champ} (before) | challenger (after) | change |", "|---|---|---|---|"]
    lines += [f"| {name} | {b:.2f} | {a:.2f} | {c} |" for name, b, a, c in scorecard_rows(evaluation)]
    n = sum(1 for s in evaluation["challenger"]["scores"] if not s["guard"])
    lines.append("")
    lines.append(f"{n} holdout questions + {len(evaluation['guard_ids'])} guard questions, greedy decoding, "
                 f"max_new_tokens={evaluation['decoding']['max_new_tokens']}; holdout hash "
                 f"`{evaluation['holdout_hash'][:12]}`; scorer {evaluation.get('scorer', 'v1')}.")
    lines += [""] + [f"- {note}" for note in notes(evaluation)]
    if decision is not None:
        lines += ["", f"**Gate: {'PROMOTE' if decision['promote'] else 'KEEP CHAMPION'}**", ""]
        lines += [f"- {r}" for r in decision["reasons"]]
    return "\n".join(lines)


def scorecard_text(evaluation: dict[str, Any]) -> str:
    champ = evaluation["champion"]["label"]
    rows = scorecard_rows(evaluation)
    width = max(len(r[0]) for r in rows) + 2
    head = f"{'metric':<{width}}{champ + ' (before)':>18}{'after':>10}{'change':>14}"
    body = [f"{name:<{width}}{b:>18.2f}{a:>10.2f}{c:>14}" for name, b, a, c in rows]
    return "\n".join([head, "-" * len(head), *body, "", *notes(evaluation)])


def scorecard_chart(evaluation: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before, after = evaluation["champion"]["summary"], evaluation["challenger"]["summary"]
    keys = [k for k, *_ in ROWS]
    labels = ["completeness", "key data", "semantic", "readability", "p50 latency (s)"]
    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=110)
    x = range(len(keys))
    ax.bar([i - 0.2 for i in x], [before[k] for k in keys], width=0.4, label=evaluation["champion"]["label"])
    ax.bar([i + 0.2 for i in x], [after[k] for k in keys], width=0.4, label="challenger")
    ax.set_xticks(list(x), labels)
    ax.set_title("ShoeFix scorecard: champion vs challenger (holdout)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
