"""Failures that retrying cannot fix, and the trainer's exit-code protocol, in one place.

Airflow retries a failed task; for some failures that only repeats the failure (a refused trigger, a
tampered candidate, a node without the GPU a recipe needs, a batch mostly quarantined). Every such
error derives from `PermanentError`, so each DAG task catches one class and fails without retries
(AirflowFailException) instead of four `try` blocks. The trainer runs as a subprocess (locally, on a
Celery GPU worker, in a Kubernetes pod), so it says the same thing with its exit code.
"""

from __future__ import annotations


class PermanentError(Exception):
    """Retrying cannot help: fail the task without retries and say why."""


class ServedArtifactMismatch(PermanentError):
    """A served artifact (the GGUF llama.cpp loads, or the base GGUF it was derived from) does not hash to
    what was recorded with its registry version: it is never served (registry/served.py)."""


# The trainer CLI's exit codes (python -m shoefix_tasks.train), read by training.dispatch and the DAGs.
EXIT_OK = 0
EXIT_PREFLIGHT = 78  # sysexits EX_CONFIG: this node cannot run the recipe (no usable GPU, not enough memory)
EXIT_OOM_FLOOR = 79  # out of GPU memory even at micro-batch 1
EXIT_STOPPED = 143  # 128 + SIGTERM: stopped on a signal after a checkpoint; a retry resumes from it
NO_RETRY_EXIT_CODES = (EXIT_PREFLIGHT, EXIT_OOM_FLOOR)
