#!/usr/bin/env bash
# The full stack's topology, natively on one machine (no Docker): Postgres and Redis from Debian's
# packages, the MLflow server (basic-auth, Postgres backend, proxied artifacts), and Airflow with
# the CeleryExecutor: scheduler, dag-processor, api-server (FAB auth), triggerer and ONE Celery
# worker listening on queues `default,gpu`, and `shoefix serve` (the champion's answer server, which
# the ShoeFix page forwards questions to). The integration tests start it the same way.
#
#   scripts/stack.sh start [STATE_DIR]    # default var/stack; prints the URLs, writes STATE_DIR/stack.env
#   source var/stack/stack.env            # then: airflow dags trigger ..., shoefix status, ...
#   scripts/stack.sh status [STATE_DIR]
#   scripts/stack.sh stop [STATE_DIR]     # stops everything it started (the data stays)
#
# Secrets: taken from the environment when set (same names as docker/.env.example), otherwise
# generated once into STATE_DIR/secrets.env (mode 600). Ports are free ones picked at first start
# (or STACK_*_PORT). SHOEFIX_HOME, SHOEFIX_DATA_DIR and SHOEFIX_POLICY (the gate policy file; unset =
# the built-in production policy) are taken from the environment when set;
# other AIRFLOW__* settings exported by the caller reach every service unchanged.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cmd="${1:-}"
STATE="$(mkdir -p "${2:-$ROOT/var/stack}" && cd "${2:-$ROOT/var/stack}" && pwd)"
LOGS="$STATE/logs" PIDS="$STATE/pids"
export PATH="$ROOT/.venv/bin:$PATH"
PG_BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
AS_PG=()
[[ "$(id -u)" == 0 ]] && AS_PG=(runuser -u postgres --)  # initdb/postgres refuse to run as root

# Free ports outside the kernel's ephemeral range, distinct from each other. Not bind(0): its port comes
# from that range, which outgoing connections also draw their source ports from, and a service starts
# minutes after its port is picked; one such connection kept the API server's port busy until the stack
# gave up. Below the range if there is room there, else above it. Ports after the count are taken
# (the operator's STACK_*_PORT): never drawn.
free_ports() {
  python3 - "$@" <<'PY'
import random, socket, sys
try:
    low, high = (int(x) for x in open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[:2])
except (OSError, ValueError):
    low, high = 32768, 60999
taken = {int(p) for p in sys.argv[2:] if p}
candidates = [p for p in (range(10000, low) if low > 11000 else range(high + 1, 65536)) if p not in taken]
random.shuffle(candidates)
found = []
for port in candidates:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
    found.append(port)
    if len(found) == int(sys.argv[1]):
        print(*found)
        break
else:
    raise SystemExit("stack: not enough free ports outside the ephemeral range")
PY
}
rand() { python3 -c 'import secrets; print(secrets.token_hex(16))'; }
log() { echo "[stack] $*" >&2; }

# Start a long-running process in its own session, under a loop that restarts it when it exits
# (what `restart: unless-stopped` does in compose). The loop's pid is the process group we stop.
spawn() {  # name, command...
  local name=$1; shift
  setsid bash -c 'while :; do "$@"; echo "[stack] exited with $?, restarting in 3 s"; sleep 3; done' \
    "$name" "$@" >>"$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! >"$PIDS/$name.pid"
}

wait_for() {  # description, timeout_s, command...
  local what=$1 timeout=$2; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS > deadline )); then log "timed out after ${timeout}s waiting for $what (logs: $LOGS)"; return 1; fi
    sleep 1
  done
}

write_config() {
  umask 077
  if [[ ! -f "$STATE/secrets.env" ]]; then
    local ports
    ports=$(free_ports 7 "${STACK_PG_PORT:-}" "${STACK_REDIS_PORT:-}" "${STACK_MLFLOW_PORT:-}" "${STACK_API_PORT:-}" \
      "${STACK_SERVE_PORT:-}") || exit 1  # all at once, so no two services get the same one
    read -r -a P <<<"$ports"
    {
      echo "POSTGRES_PASSWORD=${POSTGRES_PASSWORD:-$(rand)}"
      echo "REDIS_PASSWORD=${REDIS_PASSWORD:-$(rand)}"
      echo "AIRFLOW_ADMIN_USERNAME=${AIRFLOW_ADMIN_USERNAME:-shoefix-admin}"
      echo "AIRFLOW_ADMIN_PASSWORD=${AIRFLOW_ADMIN_PASSWORD:-$(rand)}"
      echo "AIRFLOW_FERNET_KEY=${AIRFLOW_FERNET_KEY:-$(python3 -c 'import base64, os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())')}"
      echo "AIRFLOW_API_SECRET_KEY=${AIRFLOW_API_SECRET_KEY:-$(rand)}"
      echo "AIRFLOW_JWT_SECRET=${AIRFLOW_JWT_SECRET:-$(rand)}"
      echo "MLFLOW_AUTH_ADMIN_USERNAME=${MLFLOW_AUTH_ADMIN_USERNAME:-mlflow-admin}"
      echo "MLFLOW_AUTH_ADMIN_PASSWORD=${MLFLOW_AUTH_ADMIN_PASSWORD:-$(rand)}"
      echo "MLFLOW_SECRET_KEY=${MLFLOW_SECRET_KEY:-$(rand)}"
      echo "MLFLOW_PIPELINE_USERNAME=${MLFLOW_PIPELINE_USERNAME:-shoefix-pipeline}"
      echo "MLFLOW_PIPELINE_PASSWORD=${MLFLOW_PIPELINE_PASSWORD:-$(rand)}"
      echo "PG_PORT=${STACK_PG_PORT:-${P[0]}}"
      echo "REDIS_PORT=${STACK_REDIS_PORT:-${P[1]}}"
      echo "MLFLOW_PORT=${STACK_MLFLOW_PORT:-${P[2]}}"
      echo "API_PORT=${STACK_API_PORT:-${P[3]}}"
      echo "WORKER_LOG_PORT=${P[4]}"
      echo "TRIGGERER_LOG_PORT=${P[5]}"
      echo "SERVE_PORT=${STACK_SERVE_PORT:-${P[6]}}"
    } >"$STATE/secrets.env"
  fi
  # shellcheck disable=SC1091
  source "$STATE/secrets.env"
  if [[ -z "${SERVE_PORT:-}" ]]; then  # a state folder from before the answer server: pick its port once
    SERVE_PORT=${STACK_SERVE_PORT:-$(free_ports 1 "$PG_PORT" "$REDIS_PORT" "$MLFLOW_PORT" "$API_PORT" \
      "${WORKER_LOG_PORT:-}" "${TRIGGERER_LOG_PORT:-}")} || exit 1
    echo "SERVE_PORT=$SERVE_PORT" >>"$STATE/secrets.env"
  fi
  local pg="postgresql+psycopg://shoefix:$POSTGRES_PASSWORD@127.0.0.1:$PG_PORT"
  # stack.env: what every service (and a user's shell) runs with.
  cat >"$STATE/stack.env" <<EOF
# generated by scripts/stack.sh for $STATE: source it to talk to this stack (it holds secrets)
export PATH="$ROOT/.venv/bin:\$PATH"
export STACK_STATE="$STATE" PG_PORT=$PG_PORT REDIS_PORT=$REDIS_PORT MLFLOW_PORT=$MLFLOW_PORT API_PORT=$API_PORT
export AIRFLOW_HOME="$STATE/airflow"
export AIRFLOW__CORE__DAGS_FOLDER="$ROOT/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$ROOT/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__EXECUTOR=CeleryExecutor
export AIRFLOW__CORE__AUTH_MANAGER=airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager
export AIRFLOW__CORE__FERNET_KEY="$AIRFLOW_FERNET_KEY"
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="http://127.0.0.1:$API_PORT/execution/"
export AIRFLOW__API__BASE_URL="http://127.0.0.1:$API_PORT"
export AIRFLOW__API__PORT=$API_PORT
export AIRFLOW__API__SECRET_KEY="$AIRFLOW_API_SECRET_KEY"
export AIRFLOW__API_AUTH__JWT_SECRET="$AIRFLOW_JWT_SECRET"
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="$pg/airflow"
# psycopg 3 drives the async engine too (Airflow would otherwise guess asyncpg, not installed)
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC="$pg/airflow"
export AIRFLOW__CELERY__BROKER_URL="redis://:$REDIS_PASSWORD@127.0.0.1:$REDIS_PORT/0"
export AIRFLOW__CELERY__RESULT_BACKEND="db+$pg/airflow"
export AIRFLOW__OPERATORS__DEFAULT_QUEUE=default
export AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=$WORKER_LOG_PORT AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=$TRIGGERER_LOG_PORT
export AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL=\${AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL:-30}
export SHOEFIX_HOME="${SHOEFIX_HOME:-$STATE/shoefix}"
${SHOEFIX_DATA_DIR:+export SHOEFIX_DATA_DIR="$SHOEFIX_DATA_DIR"}
${SHOEFIX_POLICY:+export SHOEFIX_POLICY="$SHOEFIX_POLICY"}
export SHOEFIX_LEDGER_URL="$pg/ledger"
export SHOEFIX_TRAIN_DISPATCH=celery
export MLFLOW_TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT"
export SHOEFIX_SERVE_PORT=$SERVE_PORT SHOEFIX_SERVING_URL="http://127.0.0.1:$SERVE_PORT"
export MLFLOW_TRACKING_USERNAME="$MLFLOW_PIPELINE_USERNAME" MLFLOW_TRACKING_PASSWORD="$MLFLOW_PIPELINE_PASSWORD"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
EOF
  # shellcheck disable=SC1091
  source "$STATE/stack.env"
}

start_postgres() {
  local data="$STATE/pgdata"
  if [[ ! -s "$data/PG_VERSION" ]]; then
    [[ -n "$PG_BIN" ]] || { log "Debian's postgresql package is not installed (apt-get install postgresql)"; exit 1; }
    mkdir -p "$data"
    local pwfile="$STATE/.pgpw"
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    if (( ${#AS_PG[@]} )); then chown postgres "$data" "$pwfile" "$STATE"; chmod 700 "$STATE"; fi
    "${AS_PG[@]}" "$PG_BIN/initdb" -D "$data" -U shoefix --pwfile="$pwfile" -A scram-sha-256 >"$LOGS/initdb.log" 2>&1
    rm -f "$pwfile"
  fi
  [[ -f "$LOGS/postgres.log" ]] || { touch "$LOGS/postgres.log"; (( ${#AS_PG[@]} )) && chown postgres "$LOGS/postgres.log"; }
  "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$data" -l "$LOGS/postgres.log" -w -t 60 \
    -o "-p $PG_PORT -k $data -c listen_addresses=127.0.0.1" start >/dev/null
  for db in airflow mlflow mlflow_auth ledger; do
    PGPASSWORD="$POSTGRES_PASSWORD" "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U shoefix -d postgres -tAq \
      -c "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1 \
      || PGPASSWORD="$POSTGRES_PASSWORD" "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U shoefix "$db"
  done
}

start_redis() {
  printf 'bind 127.0.0.1\nport %s\nrequirepass %s\ndir %s\nappendonly yes\n' \
    "$REDIS_PORT" "$REDIS_PASSWORD" "$STATE/redis" >"$STATE/redis.conf"
  mkdir -p "$STATE/redis"
  spawn redis redis-server "$STATE/redis.conf"
  wait_for redis 30 env REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli -p "$REDIS_PORT" ping
}

start_mlflow() {  # the server only: bootstrap_mlflow waits for it (Airflow's init runs meanwhile)
  spawn mlflow env MLFLOW_BACKEND_STORE_URI="postgresql+psycopg://shoefix:$POSTGRES_PASSWORD@127.0.0.1:$PG_PORT/mlflow" \
    MLFLOW_AUTH_DATABASE_URI="postgresql+psycopg://shoefix:$POSTGRES_PASSWORD@127.0.0.1:$PG_PORT/mlflow_auth" \
    MLFLOW_ARTIFACTS_DESTINATION="$STATE/mlflow-artifacts" MLFLOW_HOST=127.0.0.1 MLFLOW_PORT="$MLFLOW_PORT" \
    MLFLOW_WORKERS="${MLFLOW_WORKERS:-1}" MLFLOW_FLASK_SERVER_SECRET_KEY="$MLFLOW_SECRET_KEY" \
    MLFLOW_AUTH_ADMIN_USERNAME="$MLFLOW_AUTH_ADMIN_USERNAME" MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_AUTH_ADMIN_PASSWORD" \
    bash "$ROOT/mlflow/serve.sh"
}

bootstrap_mlflow() {  # the pipeline's user and experiment (waits until the server is healthy)
  MLFLOW_AUTH_ADMIN_USERNAME="$MLFLOW_AUTH_ADMIN_USERNAME" MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_AUTH_ADMIN_PASSWORD" \
    MLFLOW_PIPELINE_USERNAME="$MLFLOW_PIPELINE_USERNAME" MLFLOW_PIPELINE_PASSWORD="$MLFLOW_PIPELINE_PASSWORD" \
    python3 "$ROOT/mlflow/bootstrap.py" >>"$LOGS/mlflow-bootstrap.log" 2>&1 \
    || { log "MLflow bootstrap failed: $(tail -3 "$LOGS/mlflow-bootstrap.log")"; return 1; }
}

init_airflow() {
  mkdir -p "$AIRFLOW_HOME" "$SHOEFIX_HOME"
  airflow db migrate >>"$LOGS/airflow-init.log" 2>&1
  if ! airflow users list -o plain 2>/dev/null | awk '{print $2}' | grep -qx "$AIRFLOW_ADMIN_USERNAME"; then
    airflow users create --role Admin --username "$AIRFLOW_ADMIN_USERNAME" --password "$AIRFLOW_ADMIN_PASSWORD" \
      --firstname ShoeFix --lastname Admin --email admin@example.invalid >>"$LOGS/airflow-init.log" 2>&1
  fi
  # one training at a time per GPU: train_adapter runs in pool `gpu`
  airflow pools set gpu "${SHOEFIX_GPU_SLOTS:-1}" "GPU training slots (train_adapter)" >>"$LOGS/airflow-init.log" 2>&1
}

start_serve() {  # the answer server: up before the page that forwards to it; loads the champion once there is one
  spawn shoefix-serve shoefix serve
  wait_for "shoefix serve" 120 curl -sS -o /dev/null "http://127.0.0.1:$SERVE_PORT/healthz"
}

start_airflow() {
  spawn api-server airflow api-server --port "$API_PORT" --host 127.0.0.1 --workers 1
  spawn scheduler airflow scheduler
  spawn dag-processor airflow dag-processor
  spawn triggerer airflow triggerer
  # one worker for both queues on a small machine (compose runs one per queue, `gpu` on GPU nodes)
  spawn worker airflow celery worker --queues default,gpu --concurrency "${STACK_WORKER_CONCURRENCY:-2}" \
    --celery-hostname "shoefix-worker@%h"
  wait_for "the api-server" 180 curl -fsS "http://127.0.0.1:$API_PORT/api/v2/monitor/health"
}

stop_one() {
  local name=$1 pidfile="$PIDS/$1.pid"
  [[ -f "$pidfile" ]] || return 0
  local pid; pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 "${STOP_GRACE_S:-20}"); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

stop_postgres() {
  [[ -s "$STATE/pgdata/PG_VERSION" ]] || return 0
  "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$STATE/pgdata" -m fast -w stop >/dev/null 2>&1 || true
}

case "$cmd" in
  start)
    mkdir -p "$LOGS" "$PIDS"
    if [[ -f "$PIDS/api-server.pid" ]] && kill -0 "$(cat "$PIDS/api-server.pid")" 2>/dev/null; then
      log "already running (state: $STATE); \`$0 stop $STATE\` first"; exit 1
    fi
    write_config
    start_postgres
    start_redis
    start_mlflow
    init_airflow
    bootstrap_mlflow
    start_serve
    start_airflow
    cat <<EOF
ShoeFix stack up (state: $STATE, logs: $LOGS)
  Airflow UI / REST:  http://127.0.0.1:$API_PORT   (user $AIRFLOW_ADMIN_USERNAME; password in $STATE/secrets.env)
  MLflow UI / API:    http://127.0.0.1:$MLFLOW_PORT   (user $MLFLOW_AUTH_ADMIN_USERNAME; password in $STATE/secrets.env)
  Answers (OpenAI):   http://127.0.0.1:$SERVE_PORT/v1/chat/completions   (shoefix ask; /healthz)
  environment:        source $STATE/stack.env
EOF
    ;;
  stop)
    for name in worker triggerer dag-processor scheduler api-server shoefix-serve mlflow redis; do stop_one "$name"; done
    stop_postgres
    ;;
  restart-postgres)  # fault injection for the tests: an immediate stop, then start again
    write_config
    "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$STATE/pgdata" -m immediate -w stop >/dev/null
    sleep "${DOWN_S:-5}"
    "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$STATE/pgdata" -l "$LOGS/postgres.log" -w -t 60 \
      -o "-p $PG_PORT -k $STATE/pgdata -c listen_addresses=127.0.0.1" start >/dev/null
    ;;
  kill-scheduler)  # fault injection: SIGKILL the scheduler; its loop starts a new one 3 s later
    for child in $(pgrep -P "$(cat "$PIDS/scheduler.pid")"); do kill -KILL "$child"; done
    ;;
  status)
    for f in "$PIDS"/*.pid; do
      [[ -e "$f" ]] || continue
      n=$(basename "$f" .pid); kill -0 "$(cat "$f")" 2>/dev/null && echo "$n: running" || echo "$n: dead"
    done
    ;;
  *) echo "usage: $0 start|stop|status|kill-scheduler|restart-postgres [STATE_DIR]" >&2; exit 2 ;;
esac
