# Shared environment of the embedded default: everything lives under $SHOEFIX_HOME (git-ignored).
# Sourced by scripts/demo.sh and the tests' Airflow fixtures.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export SHOEFIX_HOME="${SHOEFIX_HOME:-$ROOT/var}"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$SHOEFIX_HOME/airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="$ROOT/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$ROOT/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="${AIRFLOW__DATABASE__SQL_ALCHEMY_CONN:-sqlite:///$AIRFLOW_HOME/airflow.db}"
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$SHOEFIX_HOME/mlflow/mlflow.db}"
export TOKENIZERS_PARALLELISM=false
export MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false  # models are from code: never unpickle one (also `mlflow models serve`)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PATH="$ROOT/.venv/bin:$PATH"
mkdir -p "$AIRFLOW_HOME" "$SHOEFIX_HOME/mlflow"
