"""ShoeFix's task logic, as plain functions and CLIs (never imports Airflow). The folders follow the
data flow; layers are enforced by import-linter (pyproject.toml, `lint-imports` in `make test`):

  ops/         the `shoefix` CLI, the ShoeFix page's data, what a DAG trigger may ask for
  pipeline.py  one thin function per Airflow task
  registry/    MLflow registry: versions, promotion, the served model and its safety net
  evaluation/  scorecard, safety claims, gate, meta-evaluation      (siblings, independent:)
  training/    trainer CLI, factories, recovery, dispatch, preflight
  intake/      inbox, formats, collect, GX suite, screening, holdout-leak check, validate
  model/       base model, adapters, attention, generation, prompting (siblings, independent:)
  store/       ledger, promotion lease, MLflow tracking set-up
  config.py records.py text.py policy.py errors.py   the bottom: no imports from the layers above

docs/architecture.md explains the data flow and the runtimes.
"""
