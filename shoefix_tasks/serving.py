"""The registered model, defined from code (MLflow models-from-code: nothing is pickled).

`mlflow.pyfunc.load_model("models:/shoefix-expert@champion")` runs `load_context`: it verifies the
adapter's sha256 manifest, checks it belongs to the configured base, merges it, and answers
questions given as a DataFrame column `question`, a list of strings, or one string.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel


class ShoeFixExpert(PythonModel):
    def load_context(self, context):
        from shoefix_tasks.config import Settings
        from shoefix_tasks.generation import load_answerer

        cfg = context.model_config or {}
        self.max_new_tokens = int(cfg.get("max_new_tokens", 160))
        self.repetition_penalty = float(cfg.get("repetition_penalty", 1.0))
        self.answerer = load_answerer(cfg["base_model"], Path(context.artifacts["adapter"]), Settings.from_env(),
                                      cfg.get("dtype", "float32"), label="registered")

    def predict(self, context, model_input, params=None):
        from shoefix_tasks.generation import generate

        if isinstance(model_input, str):
            questions = [model_input]
        elif hasattr(model_input, "columns"):
            col = "question" if "question" in model_input.columns else model_input.columns[0]
            questions = [str(q) for q in model_input[col].tolist()]
        else:
            questions = [str(q) for q in model_input]
        max_new = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        return [g["answer"] for g in generate(self.answerer, questions, max_new, 8, self.repetition_penalty)]


mlflow.models.set_model(ShoeFixExpert())
