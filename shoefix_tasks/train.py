"""`python -m shoefix_tasks.train`: the trainer CLI's stable entry point (Airflow tasks, Celery GPU
workers, the trainer image and `accelerate launch` call it by this name). The trainer itself is
shoefix_tasks.training.train."""

from __future__ import annotations

if __name__ == "__main__":
    from shoefix_tasks.training.train import main

    raise SystemExit(main())
