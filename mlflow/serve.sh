#!/usr/bin/env bash
# The MLflow tracking + registry server of the full stack (docker compose, or natively by
# scripts/stack.sh): basic-auth, a database backend, proxied artifacts (`--serve-artifacts`, so
# clients only ever talk HTTP to this server). Everything secret comes from the environment; the
# script refuses to start without it, or with MLflow's default admin password.
#
#   MLFLOW_BACKEND_STORE_URI      postgresql+psycopg://user:pw@host/mlflow
#   MLFLOW_ARTIFACTS_DESTINATION  s3://bucket/path (MinIO: also MLFLOW_S3_ENDPOINT_URL, AWS_*) or a folder
#   MLFLOW_AUTH_ADMIN_USERNAME    the admin user (default `admin`)
#   MLFLOW_AUTH_ADMIN_PASSWORD    its password: required, >= 12 characters, not a known default
#   MLFLOW_FLASK_SERVER_SECRET_KEY  signs the UI's sessions and CSRF tokens: required, random
#   MLFLOW_AUTH_DATABASE_URI      users and permissions (default: the backend store)
#   MLFLOW_HOST / MLFLOW_PORT     where to listen (0.0.0.0:5000)
#   MLFLOW_ALLOWED_HOSTS          Host headers to accept besides localhost (e.g. `mlflow:5000` in compose)
#   MLFLOW_AUTH_CACHE_TTL_S       how long a worker trusts a password it has checked (default 60; 0 = check
#                                 every request). A check is a deliberately slow hash (~0.5 s of CPU on a
#                                 2-core machine) and the pipeline makes one request per metric batch, upload
#                                 and tag; a password changed or user deleted through the API is refused at
#                                 once by the worker that handled it, by the others within this many seconds.
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  MLflow's server-side job runner (GenAI scorers, prompt optimization):
#                                 off by default, ShoeFix submits no jobs and each server would otherwise
#                                 start about a dozen idle consumer processes.
set -euo pipefail
: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI (postgresql+psycopg://...)}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION (s3://bucket/path or a folder)}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY (random, same on every replica)}"
case "${MLFLOW_AUTH_ADMIN_PASSWORD,,}" in
  password1234|password|admin|mlflow|changeme|secret)
    echo "refusing to start: MLFLOW_AUTH_ADMIN_PASSWORD is a well-known default" >&2; exit 1 ;;
esac
if (( ${#MLFLOW_AUTH_ADMIN_PASSWORD} < 12 )); then
  echo "refusing to start: MLFLOW_AUTH_ADMIN_PASSWORD is shorter than 12 characters" >&2
  exit 1
fi
here="$(cd "$(dirname "$0")" && pwd)"
# MLflow reads the admin credentials from its auth ini: render one from the template and the
# environment into a private file (mode 600, outside the repository), never into git.
umask 077
conf_dir="$(mktemp -d)"
conf="$conf_dir/basic_auth.ini"
trap 'rm -rf "$conf_dir"' EXIT
sed -e "s|^database_uri = .*|database_uri = ${MLFLOW_AUTH_DATABASE_URI:-$MLFLOW_BACKEND_STORE_URI}|" \
    -e "s|^admin_username = .*|admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}|" \
    "$here/basic_auth.ini" >"$conf"
printf 'admin_password = %s\n' "$MLFLOW_AUTH_ADMIN_PASSWORD" >>"$conf"
ttl="${MLFLOW_AUTH_CACHE_TTL_S:-60}"
[[ "$ttl" =~ ^[0-9]+$ ]] || { echo "refusing to start: MLFLOW_AUTH_CACHE_TTL_S must be a whole number of seconds" >&2; exit 1; }
printf 'auth_cache_ttl_seconds = %s\n' "$ttl" >>"$conf"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
export MLFLOW_AUTH_CONFIG_PATH="$conf"
extra=()
[[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]] && extra+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
# not exec: the trap removes the rendered ini (it holds the admin password) when the server stops
mlflow server \
  --app-name basic-auth \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --serve-artifacts \
  --workers "${MLFLOW_WORKERS:-2}" \
  --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" "${extra[@]}" &
server=$!
trap 'kill -TERM "$server" 2>/dev/null; wait "$server"; rm -rf "$conf_dir"' TERM INT
wait "$server"
