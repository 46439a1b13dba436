#!/usr/bin/env bash
# The test suite: lint the DAGs (ruff AIR rules) and the package, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The Postgres ledger test starts a throwaway server from Debian's `postgresql` package: install
# it when we can (root with apt), otherwise that one test says it was skipped and why.
# The full-stack tests (tests/stack) also need redis-server, and the compose test `docker-compose`.
missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null \
    || echo "could not install ${missing[*]}: the tests that need them will be skipped" >&2
fi
ruff check dags plugins shoefix_tasks tests
lint-imports  # the package's layers (pyproject.toml [tool.importlinter])
exec pytest "$@"
