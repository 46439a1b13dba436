"""The intake ledger on Postgres (the full stack's database): a throwaway server from Debian's
`postgresql` package, started by the test, runs the same collect/validate as SQLite does."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import FIXTURES

PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def postgres_url():
    if not PG_BIN:
        pytest.skip("Debian's postgresql package is not installed (apt-get install postgresql)")
    bin_dir = PG_BIN[-1]
    # pytest's tmp dirs are private to root; the server runs as `postgres` and needs its own
    tmp_path = Path(tempfile.mkdtemp(prefix="shoefix-pg-"))
    data = tmp_path / "pgdata"
    data.mkdir()
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_pg:
        shutil.chown(tmp_path, "postgres")
        shutil.chown(data, "postgres")
    subprocess.run([*as_pg, f"{bin_dir}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    port = _free_port()
    subprocess.run([*as_pg, f"{bin_dir}/pg_ctl", "-D", str(data), "-l", str(tmp_path / "pg.log"), "-w", "-o",
                    f"-p {port} -k {tmp_path} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_pg, f"{bin_dir}/pg_ctl", "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        time.sleep(0.2)
        shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.integration
def test_ledger_on_postgres_reconciles_and_is_idempotent(shoefix_env, postgres_url, monkeypatch):
    import dataclasses

    from shoefix_tasks.intake.collect import collect_batch
    from shoefix_tasks.intake.validate import validate_batch
    from shoefix_tasks.store import ledger

    s = dataclasses.replace(shoefix_env, ledger_url=postgres_url)
    rows = [json.loads(x) for x in (FIXTURES / "corpus_small.jsonl").read_text().splitlines()]
    data = b"".join(json.dumps(r).encode() + b"\n" for r in rows) + b'{"bad json\n'
    (s.home / "inbox" / "a.jsonl").write_bytes(data)
    ref = collect_batch(s, "pg-1")
    assert collect_batch(s, "pg-1") == ref  # retry returns the same batch
    res = validate_batch(s, "pg-1")
    assert res.accepted == 12 and res.quarantined == 1 and res.seen == 13
    assert validate_batch(s, "pg-1") == res
    engine = ledger.engine_for(postgres_url)
    assert engine.dialect.name == "postgresql"
    assert ledger.status_counts(engine, "pg-1") == {"accepted": 12, "quarantined": 1}
    assert len(ledger.corpus_rows(engine)) == 12
    assert collect_batch(s, "pg-2").seen == 0  # the file is processed: never counted twice
