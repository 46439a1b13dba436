#!/usr/bin/env bash
# One-shot set-up of the Airflow side: schema, the admin user, the `gpu` pool, connections.
# Idempotent: every `docker compose up` runs it again.
set -euo pipefail
airflow db migrate
# FAB's own tables (users, roles) are migrated by its DB manager during `db migrate`.
if ! airflow users list -o plain 2>/dev/null | awk '{print $2}' | grep -qx "$AIRFLOW_ADMIN_USERNAME"; then
  airflow users create --role Admin --username "$AIRFLOW_ADMIN_USERNAME" --password "$AIRFLOW_ADMIN_PASSWORD" \
    --firstname ShoeFix --lastname Admin --email "${AIRFLOW_ADMIN_EMAIL:-admin@example.invalid}"
fi
# One training at a time per GPU: train_adapter runs in pool `gpu` (raise the slots with more GPUs).
airflow pools set gpu "${SHOEFIX_GPU_SLOTS:-1}" "GPU training slots (train_adapter)"
# Notifications: a Slack webhook if one was given (silent otherwise).
if [ -n "${SLACK_WEBHOOK_URL:-}" ]; then
  airflow connections delete shoefix_slack >/dev/null 2>&1 || true
  airflow connections add shoefix_slack --conn-type slackwebhook --conn-password "$SLACK_WEBHOOK_URL"
fi
echo "airflow-init done"
