"""A version of the default base is registered with its served artifact (the adapter GGUF, hashed and
tagged); the champion opens through llama.cpp from the registry and the MLflow pyfunc answers through the
same engine; a served GGUF altered by one byte, in the artifact store or in the local cache, is refused."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pytest

from shoefix_tasks.config import REGISTERED_MODEL
from shoefix_tasks.errors import ServedArtifactMismatch
from shoefix_tasks.model.base import SMOLLM2, smollm2_gguf_path
from shoefix_tasks.registry import served

pytest.importorskip("llama_cpp")
QUESTION = "How long should wet boots dry before storage?"


@pytest.fixture()
def champion(shoefix_env, tmp_path_factory, tmp_path):
    """The default base + a LoRA, registered (as promotion does) and made champion."""
    import mlflow

    from shoefix_tasks.registry import versions
    from shoefix_tasks.store import tracking
    from tests.real_base import link_converted_base, lora_adapter

    settings = shoefix_env
    link_converted_base(tmp_path_factory, settings)
    adapter = lora_adapter(settings, tmp_path / "adapter")[2]
    tracking.configure(settings)
    with mlflow.start_run() as run:
        pass
    version = versions.register_version(run.info.run_id, adapter, SMOLLM2, {"gate_decision": "promote"}, "test",
                                        {"max_new_tokens": 24, "repetition_penalty": 1.15}, settings=settings)
    mlflow.MlflowClient().set_registered_model_alias(REGISTERED_MODEL, "champion", version.version)
    return settings, version, adapter


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the tensor data: llama.cpp would load it without complaint
    path.write_bytes(bytes(data))


def test_registered_version_records_its_served_artifact(champion, tmp_path):
    from shoefix_tasks.model.gguf_adapter import write_adapter_gguf
    from shoefix_tasks.records import sha256_file

    settings, version, adapter = champion
    tags = version.tags
    assert tags[served.TAG_ENGINE] == "llama.cpp"
    assert tags[served.TAG_BASE] == sha256_file(smollm2_gguf_path())
    # deterministic: converting the registered adapter again gives the recorded bytes
    assert write_adapter_gguf(adapter, smollm2_gguf_path(), tmp_path / "again.gguf")["sha256"] == tags[served.TAG_ADAPTER]


def test_champion_and_pyfunc_answer_through_llama_cpp(champion):
    import mlflow

    settings, version, _ = champion
    engine, info = served.open_champion(settings)
    assert info["engine"] == engine.name == "llama.cpp"
    assert info["version"] == int(version.version) and info["artifact_sha256"] == version.tags[served.TAG_ADAPTER]
    assert info["max_new_tokens"] == 24
    text = engine.answer(QUESTION, 24)
    assert text and "".join(engine.stream(QUESTION, 24)).strip() == text
    engine.close()

    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}@champion")
    assert model.unwrap_python_model().engine.name == "llama.cpp"
    answers = model.predict([QUESTION], params={"max_new_tokens": 24})
    assert len(answers) == 1 and answers[0]
    from shoefix_tasks.registry import answer_log  # answered through the pyfunc: logged for tracing too

    (logged,) = [a for a in answer_log.iter_answers(settings) if a["answer"] == answers[0]]
    assert logged["question"] == QUESTION and logged["engine"] == "llama.cpp"


def test_a_tampered_served_artifact_is_refused(champion):
    settings, version, _ = champion
    sha = version.tags[served.TAG_ADAPTER]
    served.open_champion(settings)[0].close()  # fills the local cache
    cached = settings.home / "cache" / "served" / f"{sha}.gguf"
    flip_one_byte(cached)
    with pytest.raises(ServedArtifactMismatch, match="refusing to serve"):
        served.open_champion(settings)

    cached.unlink()  # the copy in the artifact store, altered: refused on download
    stored = Path(urlparse(served.served_uri(version.source.removeprefix("models:/"))).path)
    assert stored.is_file()
    flip_one_byte(stored)
    with pytest.raises(ServedArtifactMismatch):
        served.open_champion(settings)
    assert not cached.exists()  # nothing unverified was cached
