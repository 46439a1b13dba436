#!/usr/bin/env bash
# The main job on the embedded default: the weekly retraining DAG end to end, with
# `airflow dags test` (SQLite metadata DB), MLflow on SQLite, training on the CPU.
set -euo pipefail
source "$(dirname "$0")/env.sh"
start=$(date +%s)
airflow db migrate >"$SHOEFIX_HOME/airflow-db-migrate.log" 2>&1 || { cat "$SHOEFIX_HOME/airflow-db-migrate.log"; exit 1; }
shoefix seed-inbox
airflow dags test shoefix_weekly_retrain 2>&1 | tee "$SHOEFIX_HOME/last-demo-run.log" \
  | grep --line-buffered -E "shoefix_tasks|Marking task|gate decision|nothing new|ERROR|Traceback|Error:|^\s*(metric|----|content|key-data|semantic|answer|response|composite|tokens)" || true
state=$(grep -Eo "DagRun Finished: .*state=[a-z_]+" "$SHOEFIX_HOME/last-demo-run.log" | tail -1 || true)
echo "${state:-dag run state not found in log}"
shoefix status
echo
echo "demo wall time: $(( $(date +%s) - start )) s (log: $SHOEFIX_HOME/last-demo-run.log)"
[[ "$state" == *"state=success"* ]]
