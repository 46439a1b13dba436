"""Every holdout key fact is taught by the training corpus (shoefix_tasks.evaluation.coverage, real data)."""

from __future__ import annotations

import pytest

from shoefix_tasks.evaluation.coverage import (
    SECTION,
    _Answer,
    coverage,
    load,
    markdown,
    states,
    summary,
    write_section,
)
from tests.conftest import DATA


@pytest.fixture(scope="module")
def shipped():
    corpus, holdout = load(DATA)
    return corpus, holdout, coverage(corpus, holdout)


def test_every_holdout_key_fact_is_taught(shipped):
    corpus, holdout, rows = shipped
    assert len(rows) == sum(len(h["key_facts"]) for h in holdout)
    assert {r.lang for r in rows} == {"en", "zh-TW"}
    missing = [(r.item, r.fact) for r in rows if not r.found]
    assert missing == []
    lang_of = {c["id"]: c["lang"] for c in corpus}
    assert all(lang_of[r.taught_by] == r.lang for r in rows)  # taught in the item's own language
    assert summary(rows)["all"] == (len(rows), len(rows))


def test_matching_rules_on_real_answers(shipped):
    corpus, _, _ = shipped
    by_id = {c["id"]: _Answer.of(c) for c in corpus}
    steam = by_id["perf-046-en"]  # states 100 °C, 50–60 °C, 40 °C, 24–48 hours, 24 hours
    assert states("100 °C", steam) and states("24–48 hours", steam) and states("24 hours", steam)
    assert not states("100%", steam)  # the same number with another unit is not the fact
    assert not states("48 hours", steam)  # nor one end of a stated range
    alcohol = by_id["odor-015-en"]  # "evaporates", and no EVA foam anywhere
    assert "evaporat" in alcohol.text and not states("EVA", alcohol)
    assert states("REACH Annex XVII", by_id["health-025-zh"]) and states("醋酸鈉", by_id["odor-046-zh"])


def test_markdown_and_docs_section(tmp_path, shipped):
    _, holdout, rows = shipped
    table = markdown(rows)
    assert all(f"| {h['id']} |" in table for h in holdout)
    doc = tmp_path / "quality.md"
    doc.write_text("# Quality\n\n## Other\n\nkeep me\n\n" + SECTION + "\n\nold table\n\n## After\n\nkeep too\n")
    write_section(doc, table)
    text = doc.read_text()
    assert "old table" not in text and "keep me" in text and "keep too" in text and text.count(SECTION) == 1
    write_section(doc, table)  # idempotent
    assert doc.read_text() == text


def test_the_cli_reads_the_configured_data_by_default(capsys, monkeypatch, shipped):
    """`python -m shoefix_tasks.evaluation.coverage --write-docs docs/quality.md` writes the issue's table: with
    no --data it must count the shipped holdout's facts, not an empty folder guessed from the module's path."""
    from shoefix_tasks.evaluation.coverage import main

    monkeypatch.delenv("SHOEFIX_DATA_DIR", raising=False)
    _, _, rows = shipped
    assert main([]) == 0
    assert f"| all | {len(rows)} | {len(rows)} | 100.0% |" in capsys.readouterr().out
