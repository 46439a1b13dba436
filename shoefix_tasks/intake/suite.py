"""The intake's Great Expectations suite, as code, and how a batch is shown to it.

GX sees the batch with `<field>_ok` type columns, the question/answer *lengths* and topic/lang
(redacted unless a plain word): GX echoes failing values into its validation results and Data
Docs, which are logged to MLflow, and Q&A text may carry PII. The ledger keeps the raw record.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from shoefix_tasks.config import LANGS, TOPICS

TEXT_BOUNDS = {"question": (8, 600), "answer": (40, 4000)}  # characters


_SHOWN = re.compile(r"[A-Za-z][A-Za-z_-]{0,31}")


def _shown(value: Any) -> str | None:
    """A topic/lang value as GX may see it. GX reports failing values in the validation result
    and the Data Docs (which go to MLflow): a plain word is shown, anything else (an email pasted
    into `topic`...) is redacted. The ledger keeps the raw record."""
    if not isinstance(value, str):
        return None
    return value if _SHOWN.fullmatch(value) else "<redacted>"


def build_frame(payloads: list[dict[str, Any]]):
    """The batch as GX sees it: `<field>_ok` type columns, the question/answer *lengths* (never the
    text: failing values are echoed into the Data Docs, and Q&A text may carry PII) and topic/lang."""
    import pandas as pd

    cols: dict[str, list] = {}
    for name in ("id", "question", "answer", "topic", "lang"):
        values = [p.get(name) for p in payloads]
        cols[f"{name}_ok"] = [isinstance(v, str) and bool(v.strip()) for v in values]
        if name in TEXT_BOUNDS:
            cols[f"{name}_chars"] = [len(v) if isinstance(v, str) else None for v in values]
        elif name != "id":
            cols[name] = [_shown(v) for v in values]
    return pd.DataFrame(cols)


def build_suite():
    """The intake suite, as code. Kept small and explicit: each expectation is a quarantine reason."""
    import great_expectations as gx

    e = gx.expectations
    suite = gx.ExpectationSuite(name="shoefix_qa_intake")
    for name in ("id", "question", "answer", "topic", "lang"):
        suite.add_expectation(e.ExpectColumnValuesToBeInSet(column=f"{name}_ok", value_set=[True]))
    for name, (lo, hi) in TEXT_BOUNDS.items():
        suite.add_expectation(e.ExpectColumnValuesToBeBetween(column=f"{name}_chars", min_value=lo, max_value=hi))
    suite.add_expectation(e.ExpectColumnValuesToBeInSet(column="topic", value_set=list(TOPICS)))
    suite.add_expectation(e.ExpectColumnValuesToBeInSet(column="lang", value_set=list(LANGS)))
    return suite


def run_suite(frame, docs_root: Path | None = None, run_name: str = "batch") -> tuple[dict[int, list[str]], str | None]:
    """Run the suite; map row index -> failed check names. With `docs_root`, run it through a
    file-backed GX project's checkpoint that also rebuilds the Data Docs; returns their index path."""
    import great_expectations as gx

    if docs_root is None:
        context = gx.get_context(mode="ephemeral")
    else:
        docs_root.mkdir(parents=True, exist_ok=True)
        context = gx.get_context(mode="file", project_root_dir=str(docs_root))
    source = context.data_sources.add_or_update_pandas("inbox")
    asset = next((a for a in source.assets if a.name == "batch"), None) or source.add_dataframe_asset("batch")
    batch_def = next((b for b in asset.batch_definitions if b.name == "whole"), None) \
        or asset.add_batch_definition_whole_dataframe("whole")
    suite = context.suites.add_or_update(build_suite())
    validation = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name="shoefix_intake", data=batch_def, suite=suite))
    actions = [gx.checkpoint.UpdateDataDocsAction(name="data_docs")] if docs_root is not None else []
    checkpoint = context.checkpoints.add_or_update(gx.Checkpoint(
        name="shoefix_intake", validation_definitions=[validation], actions=actions,
        result_format={"result_format": "COMPLETE"}))
    run_id = gx.core.run_identifier.RunIdentifier(run_name=run_name)
    result = checkpoint.run(batch_parameters={"dataframe": frame}, run_id=run_id)
    failures: dict[int, list[str]] = {}
    for validation_result in result.run_results.values():
        for er in validation_result.results:
            cfg = er.expectation_config
            name = f"gx:{cfg.type}({cfg.kwargs.get('column')})"
            for idx in er.result.get("unexpected_index_list") or []:
                failures.setdefault(int(idx), []).append(name)
    docs = None
    if docs_root is not None:
        docs = docs_root / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html"
    return failures, str(docs) if docs else None
