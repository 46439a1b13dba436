#!/usr/bin/env bash
# The main job on the embedded default: the weekly retraining DAG end to end, with
# `airflow dags test` (SQLite metadata DB), MLflow on SQLite, training on the CPU.
# The scorecard is printed only when this run evaluated a challenger; otherwise the run's own
# account of what it did (e.g. "nothing new: 1 file deferred (...)"), never an earlier scorecard.
set -euo pipefail
source "$(dirname "$0")/env.sh"
start=$(date +%s)
log="$SHOEFIX_HOME/last-demo-run.log"
airflow db migrate >"$SHOEFIX_HOME/airflow-db-migrate.log" 2>&1 || { cat "$SHOEFIX_HOME/airflow-db-migrate.log"; exit 1; }
shoefix seed-inbox
airflow dags test shoefix_weekly_retrain 2>&1 | tee "$log" \
  | grep --line-buffered -E "shoefix_tasks|Marking task|gate decision|nothing new|ERROR|Traceback|Error:|^\s*(metric|----|content|key-data|semantic|answer|response|composite|tokens)" || true
state=$(grep -Eo "DagRun Finished: .*state=[a-z_]+" "$log" | tail -1 || true)
echo "${state:-dag run state not found in log}"
run_id=$(sed -nE 's/.*[ ,]run_id=([^,]+),.*/\1/p' <<<"$state")
run_dir=$(python -c 'import sys; from shoefix_tasks.config import Settings; print(Settings.from_env().run_dir(sys.argv[1]))' "${run_id:-none}")
if [[ -n "$run_id" && -f "$run_dir/evaluation.json" ]]; then
  shoefix status
else
  echo
  echo "No scorecard from this run ${run_id:-(run id not found)}: nothing was evaluated. What it did:"
  # the run's own one-line accounts: collection (shoefix_tasks.intake.collect) and validation
  sed -nE -e 's/.*\] collect_qa [^ ]+: (.*) \[shoefix_tasks[.a-z_]*\].*/  \1/p' \
    -e 's/.*\] validated batch [^ ]+: (.*) \[shoefix_tasks[.a-z_]*\].*/  validation: \1/p' "$log"
  echo "The champion is unchanged. \`shoefix status\` shows it and the last scorecard, labelled with its run."
fi
echo
echo "demo wall time: $(( $(date +%s) - start )) s (log: $log)"
[[ "$state" == *"state=success"* ]]
