"""CSV rows must fit their header: a row with more or fewer cells than the header is quarantined
with its raw bytes and a reason, never accepted with a cell dropped or a column left empty."""

from __future__ import annotations

import json

import sqlalchemy as sa

from shoefix_tasks.intake.collect import collect_batch
from shoefix_tasks.intake.validate import validate_batch
from shoefix_tasks.store import ledger
from tests.conftest import FIXTURES

ROWS = [json.loads(x) for x in (FIXTURES / "corpus_small.jsonl").read_text().splitlines()]


def cells(i: int, rid: str) -> str:
    return f'{rid},"{ROWS[i]["question"]}","{ROWS[i]["answer"]}",{ROWS[i]["topic"]},en'


def test_rows_that_do_not_fit_the_header_are_quarantined(shoefix_env):
    s = shoefix_env
    extra = cells(1, "c-extra") + ",alice"  # a sixth cell under no column
    short = f'c-short,"{ROWS[2]["question"]}","{ROWS[2]["answer"]}",{ROWS[2]["topic"]}'  # no lang cell
    lines = ["id,question,answer,topic,lang", cells(0, "c-ok"), extra, short, cells(3, "c-ok2")]
    (s.home / "inbox" / "batch.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    ref = collect_batch(s, "r1")
    res = validate_batch(s, "r1", max_quarantine_rate=1.0)
    assert (ref.seen, res.accepted, res.quarantined) == (4, 2, 2)
    assert res.reasons == {"malformed_csv_row": 2}
    r = ledger.records
    with ledger.engine_for(s.ledger_url).connect() as conn:
        bad = conn.execute(sa.select(r.c.line_no, r.c.reason, r.c.raw).where(r.c.status == "quarantined")
                           .order_by(r.c.line_no)).all()
    assert [tuple(b) for b in bad] == [
        (2, "malformed_csv_row: 6 cells, header has 5", extra.encode()),
        (3, "malformed_csv_row: 4 cells, header has 5", short.encode()),
    ]
    assert {x["id"] for x in ledger.corpus_rows(ledger.engine_for(s.ledger_url))} == {"c-ok", "c-ok2"}
