"""The one place that says how a question becomes model input (training, evaluation and serving
must agree, or the adapter learns one format and is scored on another)."""

from __future__ import annotations

# Short on purpose: every training and evaluation token pays for it (about 25 tokens).
SYSTEM_PROMPT = "You are ShoeFix, an expert on keeping shoes free of mold. Answer accurately, with the key numbers."


def prompt_messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


def training_example(question: str, answer: str) -> dict[str, list[dict[str, str]]]:
    """TRL's conversational prompt-completion form: the loss falls on the completion only."""
    return {"prompt": prompt_messages(question), "completion": [{"role": "assistant", "content": answer}]}
