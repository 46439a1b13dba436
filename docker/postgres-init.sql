-- One Postgres server, one database per concern (run once, on an empty data volume).
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
CREATE DATABASE ledger;
