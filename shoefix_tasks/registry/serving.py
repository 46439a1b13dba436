"""The registered model, defined from code (MLflow models-from-code: nothing is pickled).

`mlflow.pyfunc.load_model("models:/shoefix-expert@champion")` runs `load_context`: it verifies the
adapter's sha256 manifest, checks it belongs to the configured base, merges it, and answers
questions given as a DataFrame column `question`, a list of strings, or one string. Every answer
passes the safety net (shoefix_tasks.registry.safety) before it is returned.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class ShoeFixExpert(PythonModel):
    def load_context(self, context):
        from shoefix_tasks.config import Settings
        from shoefix_tasks.model.generation import load_answerer

        cfg = context.model_config or {}
        self.max_new_tokens = int(cfg.get("max_new_tokens", 160))
        self.repetition_penalty = float(cfg.get("repetition_penalty", 1.0))
        self.settings = Settings.from_env()
        self.answerer = load_answerer(cfg["base_model"], Path(context.artifacts["adapter"]), self.settings,
                                      cfg.get("dtype", "float32"), label="registered")

    # The hint is what pyfunc hands over under the registered signature (a frame of questions); it
    # is also MLflow's "no schema from hints" type, so the explicit signature stays the contract.
    # Called directly (tests, `shoefix ask`), a list of strings or one string works too.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        from shoefix_tasks.model.adapter import adapter_digest
        from shoefix_tasks.model.generation import generate
        from shoefix_tasks.registry.safety import check_answer

        if isinstance(model_input, str):
            questions = [model_input]
        elif hasattr(model_input, "columns"):
            col = "question" if "question" in model_input.columns else model_input.columns[0]
            questions = [str(q) for q in model_input[col].tolist()]
        else:
            questions = [str(q) for q in model_input]
        max_new = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        gens = generate(self.answerer, questions, max_new, 8, self.repetition_penalty)
        model = adapter_digest(self.answerer.manifest)[:12] if self.answerer.manifest else "base"
        return [check_answer(q, g["answer"], self.settings.data_dir, self.settings.home, model=model).answer
                for q, g in zip(questions, gens, strict=True)]


mlflow.models.set_model(ShoeFixExpert())
