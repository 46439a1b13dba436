"""Persistence below everything: the ledger (SQL), its promotion lease, MLflow tracking set-up."""
