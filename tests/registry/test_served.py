"""A version of the default base is registered with its served artifact (the base with the adapter merged
in, hashed and tagged); the champion opens through llama.cpp from the registry and the MLflow pyfunc
answers through the same engine; a served GGUF altered by one byte, in the artifact store or in the local
cache, is refused. A version registered before the merge (the adapter as a GGUF LoRA) opens as it was
registered."""

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
    from shoefix_tasks.model.engines import FORM_MERGED, served_gguf_for
    from shoefix_tasks.records import sha256_file

    settings, version, adapter = champion
    tags = version.tags
    assert tags[served.TAG_ENGINE] == "llama.cpp" and tags[served.TAG_FORM] == FORM_MERGED
    assert tags[served.TAG_BASE] == sha256_file(smollm2_gguf_path())
    # deterministic: deriving again from the registered adapter gives the recorded bytes, and so does the
    # derivation evaluation uses, so the gate scores the file that is served
    again = served.derive_served(adapter, SMOLLM2, tmp_path / "again")[1]
    assert again[served.TAG_SHA] == tags[served.TAG_SHA]
    assert sha256_file(served_gguf_for(adapter, smollm2_gguf_path(), settings)) == tags[served.TAG_SHA]


def test_champion_and_pyfunc_answer_through_llama_cpp(champion):
    import mlflow

    settings, version, _ = champion
    engine, info = served.open_champion(settings)
    assert info["engine"] == engine.name == "llama.cpp"
    assert info["version"] == int(version.version) and info["artifact_sha256"] == version.tags[served.TAG_SHA]
    assert info["served_form"] == engine.form == version.tags[served.TAG_FORM] and engine.adapter_gguf is None
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
    sha = version.tags[served.TAG_SHA]
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


LEGACY_SERVING = Path(__file__).resolve().parent.parent / "fixtures" / "legacy" / "serving_5d413e6.py"


def test_a_version_registered_before_the_merge_opens_as_registered(shoefix_env, tmp_path_factory, tmp_path,
                                                                   monkeypatch):
    """Registered as versions were before the merge: the adapter alone as a GGUF LoRA, and the serving.py of
    that time (MLflow copies it into the logged model and runs that copy at load: tests/fixtures/legacy is
    the file as of commit 5d413e6). It opens as base + that LoRA through open_champion and through the
    pyfunc, its file checked against its own recorded hash, and a flipped byte is still refused."""
    import mlflow

    from shoefix_tasks.model.engines import FORM_LORA
    from shoefix_tasks.model.gguf_adapter import write_adapter_gguf
    from shoefix_tasks.records import sha256_file
    from shoefix_tasks.registry import serving, versions
    from shoefix_tasks.store import tracking
    from tests.real_base import link_converted_base, lora_adapter

    def derive_as_before(adapter_dir, base_model, work):  # what registration derived before the merge
        work.mkdir(parents=True, exist_ok=True)
        info = write_adapter_gguf(adapter_dir, smollm2_gguf_path(), work / "adapter.gguf")
        return ({"served_adapter": str(work / "adapter.gguf")},
                {served.TAG_ENGINE: "llama.cpp", "served_adapter_sha256": info["sha256"],
                 served.TAG_BASE: sha256_file(smollm2_gguf_path())})

    settings = shoefix_env
    link_converted_base(tmp_path_factory, settings)
    adapter = lora_adapter(settings, tmp_path / "adapter")[2]
    tracking.configure(settings)
    monkeypatch.setattr(served, "derive_served", derive_as_before)
    monkeypatch.setattr(serving, "__file__", str(LEGACY_SERVING))
    with mlflow.start_run() as run:
        pass
    version = versions.register_version(run.info.run_id, adapter, SMOLLM2, {}, "before the merge",
                                        {"max_new_tokens": 24}, settings=settings)
    monkeypatch.undo()
    mlflow.MlflowClient().set_registered_model_alias(REGISTERED_MODEL, "champion", version.version)
    assert served.TAG_FORM not in version.tags and served.served_form(version.tags) == FORM_LORA

    engine, info = served.open_champion(settings)
    assert info["served_form"] == engine.form == FORM_LORA and engine.adapter_gguf is not None
    assert info["artifact_sha256"] == version.tags["served_adapter_sha256"] and engine.answer(QUESTION, 8)
    engine.close()
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}@champion")
    python_model = model.unwrap_python_model()
    assert type(python_model).__module__ != serving.__name__  # the logged copy of the old file ran
    assert python_model.engine.form == FORM_LORA and model.predict([QUESTION], params={"max_new_tokens": 8})[0]

    flip_one_byte(settings.home / "cache" / "served" / f"{version.tags['served_adapter_sha256']}.gguf")
    with pytest.raises(ServedArtifactMismatch, match="refusing to serve"):
        served.open_champion(settings)


@pytest.mark.parametrize("tags", [
    {"served_form": "gguf-merged-q4_1", "served_model_sha256": "x"},  # a form nobody derives: a forged tag
    {"served_form": "gguf-merged-q8_0"},                                # the form, without its hash
    {},                                                                 # no form at all
])
def test_a_served_file_without_a_known_form_and_its_hash_is_refused(tmp_path, tags):
    """Whatever a version's tags claim, a file opens only under a known form whose recorded hash it has."""
    from shoefix_tasks.records import sha256_file

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF not really")
    forged = {k: (sha256_file(gguf) if v == "x" else v) for k, v in tags.items()}
    with pytest.raises(ServedArtifactMismatch, match="refusing to serve"):
        served.check_served(gguf, forged, None, "a forged version")
