"""The `shoefix` CLI says what went wrong in one line and exits non-zero, never with a traceback."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT, env_with


def shoefix(settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shoefix_tasks.ops.cli", *args], env=env_with(settings),
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_errors_are_one_line_and_exit_non_zero(shoefix_env):
    s = shoefix_env
    out = shoefix(s, "rollback", "--to", "5", "--reason", "v4 regressed on guard questions")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    (line,) = out.stderr.strip().splitlines()  # one line, on a store used for the first time too
    assert line.startswith("shoefix rollback: not found: "), out.stderr

    out = shoefix(s, "rollback", "--to", "1", "--reason", "   ")  # whitespace is no reason: refused, exit 2
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("shoefix rollback: refused: a rollback needs a reason")
