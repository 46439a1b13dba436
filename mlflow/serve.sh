#!/usr/bin/env bash
# The MLflow tracking + registry server of the full stack. Everything secret comes from the
# environment; the script refuses to start without it.
set -euo pipefail
: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI (postgresql://...)}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION (s3://bucket/path)}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD}"
if [[ "$MLFLOW_AUTH_ADMIN_PASSWORD" == "password1234" || ${#MLFLOW_AUTH_ADMIN_PASSWORD} -lt 12 ]]; then
  echo "refusing to start: MLFLOW_AUTH_ADMIN_PASSWORD is the default or shorter than 12 characters" >&2
  exit 1
fi
here="$(cd "$(dirname "$0")" && pwd)"
# MLflow reads the admin password from its auth ini: render one from the template and the
# environment into a private file, never into the repository.
conf="$(mktemp -d)/basic_auth.ini"
umask 077
sed -e "s|^database_uri = .*|database_uri = ${MLFLOW_AUTH_DATABASE_URI:-$MLFLOW_BACKEND_STORE_URI}|" \
    "$here/basic_auth.ini" >"$conf"
printf 'admin_password = %s\n' "$MLFLOW_AUTH_ADMIN_PASSWORD" >>"$conf"
export MLFLOW_AUTH_CONFIG_PATH="$conf"
exec mlflow server \
  --app-name basic-auth \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --serve-artifacts \
  --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}"
