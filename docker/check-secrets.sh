#!/bin/sh
# Refuse to deploy with a missing, short or well-known secret. compose's `${VAR:?}` already
# rejects unset/empty ones; this rejects the defaults of the images and tutorials we build on.
set -eu
fail=0
for var in POSTGRES_PASSWORD REDIS_PASSWORD MINIO_ROOT_PASSWORD AIRFLOW_ADMIN_PASSWORD AIRFLOW_API_SECRET_KEY \
           AIRFLOW_JWT_SECRET MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_PIPELINE_PASSWORD MLFLOW_SECRET_KEY; do
  eval "value=\${$var:-}"
  lower=$(printf '%s' "$value" | tr 'A-Z' 'a-z')
  case "$lower" in
    ""|admin|airflow|minioadmin|password|password1234|postgres|redis|mlflow|changeme|change-me|secret|shoefix|12345678*)
      echo "refusing to start: $var is empty or a well-known default" >&2; fail=1; continue ;;
  esac
  if [ "${#value}" -lt 12 ]; then
    echo "refusing to start: $var is shorter than 12 characters" >&2; fail=1
  fi
done
# MinIO's root user doubles as the S3 access key: its default is as public as its password.
[ "${MINIO_ROOT_USER:-minioadmin}" = minioadmin ] && { echo "refusing to start: MINIO_ROOT_USER is minioadmin" >&2; fail=1; }
[ "${#AIRFLOW_FERNET_KEY}" -eq 44 ] || { echo "refusing to start: AIRFLOW_FERNET_KEY is not a Fernet key (44 chars)" >&2; fail=1; }
[ "$fail" = 0 ] && echo "secrets checked"
exit "$fail"
