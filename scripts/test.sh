#!/usr/bin/env bash
# The test suite: lint the DAGs (ruff AIR rules) and the package, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check dags plugins shoefix_tasks tests
exec pytest "$@"
