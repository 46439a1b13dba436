"""The registered model, defined from code (MLflow models-from-code: nothing is pickled).

`mlflow.pyfunc.load_model("models:/shoefix-expert@champion")` runs `load_context`: it verifies the
adapter's sha256 manifest, checks it belongs to the configured base, and opens the engine the version
serves with (model/engines.py): llama.cpp with the served GGUF (`served_model`, the base with the adapter
merged in; `served_adapter` for versions registered before the merge), whose sha256 and the base GGUF's
must match the ones recorded in the model config (registry/served.py), or transformers. It
answers questions given as a DataFrame column `question`, a list of strings, or one string. Every
answer passes the safety net (shoefix_tasks.registry.safety) before it is returned, and is logged for
tracing like the answer server's (registry/answer_log: a local spool, sent to MLflow later).
"""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class ShoeFixExpert(PythonModel):
    def load_context(self, context):
        from shoefix_tasks.config import Settings
        from shoefix_tasks.errors import ServedArtifactMismatch
        from shoefix_tasks.model.engines import FORM_MERGED, open_engine, shipped_gguf
        from shoefix_tasks.registry.served import FORMS, TAG_ENGINE, check_served, served_form

        cfg = context.model_config or {}
        self.max_new_tokens = int(cfg.get("max_new_tokens", 160))
        self.settings = Settings.from_env()
        form = served_form(cfg)
        served = context.artifacts.get(FORMS[form][0]) if form in FORMS else None
        engine = cfg.get(TAG_ENGINE, "transformers")  # models logged before served artifacts: as they were
        if engine == "llama.cpp" and not served:
            raise ServedArtifactMismatch(f"the registered model is for llama.cpp ({form}) but has no served file")
        if served:
            check_served(Path(served), cfg, shipped_gguf(cfg["base_model"]), "the registered model")
        self.engine = open_engine(cfg["base_model"], Path(context.artifacts["adapter"]), self.settings,
                                  dtype=cfg.get("dtype", "float32"),
                                  repetition_penalty=float(cfg.get("repetition_penalty", 1.0)), engine=engine,
                                  label="registered", served_gguf=Path(served) if served else None,
                                  served_form=form or FORM_MERGED)

    # The hint is what pyfunc hands over under the registered signature (a frame of questions); it
    # is also MLflow's "no schema from hints" type, so the explicit signature stays the contract.
    # Called directly (tests, `shoefix ask`), a list of strings or one string works too.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        from shoefix_tasks.model.adapter import adapter_digest
        from shoefix_tasks.registry import answer_log
        from shoefix_tasks.registry.safety import check_answer

        if isinstance(model_input, str):
            questions = [model_input]
        elif hasattr(model_input, "columns"):
            col = "question" if "question" in model_input.columns else model_input.columns[0]
            questions = [str(q) for q in model_input[col].tolist()]
        else:
            questions = [str(q) for q in model_input]
        max_new = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        started = time.perf_counter()
        gens = self.engine.answer_many(questions, max_new)
        seconds = (time.perf_counter() - started) / max(1, len(questions))
        manifest = self.engine.manifest
        model = adapter_digest(manifest)[:12] if manifest else "base"
        answers = [check_answer(q, g["answer"], self.settings.data_dir, self.settings.home, model=model).answer
                   for q, g in zip(questions, gens, strict=True)]
        for q, a, g in zip(questions, answers, gens, strict=True):  # traced like the server's (never raises)
            answer_log.record_answer(self.settings, q, a, model_version=f"adapter {model}", latency_s=seconds,
                                     tokens=int(g.get("new_tokens") or len(a.split())), engine=self.engine.name)
        return answers


mlflow.models.set_model(ShoeFixExpert())
