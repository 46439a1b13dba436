#!/usr/bin/env bash
# The test suite: lint the DAGs (ruff AIR rules) and the package, then pytest on three workers.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Debian packages some tests need, installed when we can (root with apt); otherwise those tests say
# they were skipped and why:
# - `postgresql`: the Postgres ledger test starts a throwaway server;
# - `redis-server` (and postgresql): the full-stack tests (tests/stack) start the stack natively;
# - `docker-compose`: the compose file is checked with `docker-compose config`;
# - `chromium`: the ShoeFix page test screenshots the page in a headless browser.
missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || missing+=(docker-compose)
command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null \
  || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1; }
  # all at once; if that fails, one by one, so that one missing package skips only its own tests
  if ! { apt-get update -qq >/dev/null 2>&1 && apt_install "${missing[@]}"; }; then
    for pkg in "${missing[@]}"; do
      apt_install "$pkg" || echo "could not install $pkg: the tests that need it will be skipped" >&2
    done
  fi
fi
ruff check dags plugins shoefix_tasks tests
lint-imports  # the package's layers (pyproject.toml [tool.importlinter])
# Three workers on two cores (SHOEFIX_TEST_WORKERS to change): much of a test's time is spent waiting on
# the processes it starts (Airflow, the trainer, servers), which a third worker can fill; measured, two and
# three workers differ by less than their run-to-run spread, four was slower (docs/benchmarks.md, "Test time"). The full-stack tests are one work unit, each other
# module another (tests/conftest.py: pytest_xdist_make_scheduler), the longest first; `-n 0` in the
# arguments runs serially.
exec pytest -n "${SHOEFIX_TEST_WORKERS:-3}" --dist loadscope --no-loadscope-reorder "$@"
