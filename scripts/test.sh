#!/usr/bin/env bash
# The test suite: lint the DAGs (ruff AIR rules) and the package, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The Postgres ledger test starts a throwaway server from Debian's `postgresql` package: install
# it when we can (root with apt), otherwise that one test says it was skipped and why.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >/dev/null \
    || echo "could not install postgresql: the Postgres ledger test will be skipped" >&2
fi
ruff check dags plugins shoefix_tasks tests
exec pytest "$@"
