"""Issue 7, scenarios 9, 10 and 12: what evaluation refuses, and that it is repeatable.

9. A tampered adapter (one flipped byte), a pickle beside or instead of the safetensors, a tampered
   champion in the artifact store, a cloudpickled MLflow model: refused at load, champion unchanged.
10. An adapter made for another base model, or a base whose tokenizer changed: the candidate is
    rejected clearly (recorded on its evaluate run) and never promoted.
12. The same evaluation run twice: the same answers, the same scores, the same decision.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from shoefix_tasks import pipeline
from shoefix_tasks.evaluation.evaluate import CandidateRejected
from shoefix_tasks.model.adapter import AdapterIntegrityError, write_manifest
from shoefix_tasks.registry import versions as registry
from shoefix_tasks.store import tracking
from tests.conftest import build_tiny_model
from tests.reliability.test_registry_faults import make_adapter, register, training_run


def with_champion(settings, base: Path, tmp_path: Path) -> int:
    """A registered champion v1 (a real adapter on `base`)."""
    train = training_run(settings, "champ", make_adapter(base, settings, tmp_path / "champ", seed=1))
    version = int(register(settings, base, train).version)
    with registry.promotion_lock(settings, "test") as lease:
        registry.set_champion(settings, version, "first", "test", lease=lease)
    return version


def rejected_tag(run_key: str) -> str:
    import mlflow

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("shoefix").experiment_id
    runs = client.search_runs([exp], f"tags.`shoefix.stage` = 'evaluate' and tags.`shoefix.run_key` = '{run_key}'")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    return runs[0].data.tags["shoefix.rejected"]


class Boom:
    """Unpickling this creates a file: proof of whether anything was ever unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.integration
def test_tampered_or_pickled_adapters_are_refused_and_the_champion_stays(shoefix_env, tiny_model, tiny_recipe,
                                                                         tmp_path):
    import mlflow

    s, recipe = shoefix_env, str(tiny_recipe)
    tracking.configure(s)
    champ = with_champion(s, tiny_model, tmp_path)
    marker = tmp_path / "unpickled"

    # one flipped byte in the candidate's weights
    flipped = make_adapter(tiny_model, s, tmp_path / "flip", seed=2)
    blob = bytearray((flipped / "adapter_model.safetensors").read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (flipped / "adapter_model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CandidateRejected, match="does not match its sha256"):
        pipeline.evaluate_adapter("flip", recipe, training_run(s, "flip", flipped), settings=s)
    assert "sha256" in rejected_tag("flip")

    # a pickle beside the safetensors (listed in a manifest or not): never loaded
    extra = make_adapter(tiny_model, s, tmp_path / "extra", seed=3)
    (extra / "adapter_model.bin").write_bytes(pickle.dumps(Boom(marker)))
    with pytest.raises(CandidateRejected, match="pickle"):
        pipeline.evaluate_adapter("extra", recipe, training_run(s, "extra", extra), settings=s)
    with pytest.raises(AdapterIntegrityError, match="non-safetensors"):
        write_manifest(extra, {"name": "tiny"})  # nor can one be released with a pickle in it

    # pickle bytes *named* .safetensors, with a manifest re-written to match: the safetensors
    # parser refuses the file; nothing is unpickled
    disguised = make_adapter(tiny_model, s, tmp_path / "disguised", seed=4)
    (disguised / "adapter_model.safetensors").write_bytes(pickle.dumps(Boom(marker)))
    manifest = json.loads((disguised / "shoefix_manifest.json").read_text())
    write_manifest(disguised, manifest["base"])
    with pytest.raises(Exception) as err:  # noqa: PT011 - safetensors' own header error
        pipeline.evaluate_adapter("disguised", recipe, training_run(s, "disguised", disguised), settings=s)
    assert "safetensors" in repr(err.value).lower() or "header" in repr(err.value).lower()
    assert not marker.exists()

    # the champion's weights tampered in the artifact store itself: refused on download and on
    # pyfunc load (serving), and a new candidate cannot be compared against it
    version = registry.version_by_alias("champion")
    shutil.rmtree(s.home / "cache", ignore_errors=True)
    stored = next(Path(registry.adapter_uri(version).removeprefix("file://")).rglob("adapter_model.safetensors"))
    blob = bytearray(stored.read_bytes())
    blob[-1] ^= 0xFF
    stored.write_bytes(bytes(blob))
    with pytest.raises(AdapterIntegrityError):
        registry.download_adapter(version, s)
    with pytest.raises(AdapterIntegrityError):
        mlflow.pyfunc.load_model("models:/shoefix-expert@champion")
    good = make_adapter(tiny_model, s, tmp_path / "good", seed=5)
    with pytest.raises(AdapterIntegrityError):
        pipeline.evaluate_adapter("good", recipe, training_run(s, "good", good), settings=s)

    assert int(registry.version_by_alias("champion").version) == champ
    assert [h["version"] for h in registry.champion_history(s)] == [champ]


class Pickled(__import__("mlflow").pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


@pytest.mark.integration
def test_mlflow_refuses_to_unpickle_a_model(shoefix_env):
    import mlflow

    tracking.configure(shoefix_env)  # every ShoeFix process configures MLflow this way
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="pickled", python_model=Pickled())  # cloudpickle format
    with pytest.raises(mlflow.exceptions.MlflowException, match="pickle is disallowed"):
        mlflow.pyfunc.load_model(info.model_uri)


@pytest.mark.integration
def test_adapter_for_another_base_or_tokenizer_is_rejected_not_promoted(shoefix_env, tiny_model, tiny_recipe,
                                                                        tmp_path):
    import yaml

    s = shoefix_env
    tracking.configure(s)
    data = yaml.safe_load(tiny_recipe.read_text())

    # trained (made) on another base: same architecture and tokenizer, different weights
    other = build_tiny_model(tmp_path / "other-base", seed=1)
    data["model"]["base_model"] = str(other)
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(data))
    foreign = make_adapter(tiny_model, s, tmp_path / "foreign", seed=2)
    with pytest.raises(CandidateRejected, match="trained on base"):
        pipeline.evaluate_adapter("foreign", str(tmp_path / "other.yaml"), training_run(s, "foreign", foreign),
                                  settings=s)
    assert "trained on base" in rejected_tag("foreign")

    # the base's tokenizer replaced in place after the adapter was made (the identity was cached)
    base = tmp_path / "base-copy"
    shutil.copytree(tiny_model, base)
    data["model"]["base_model"] = str(base)
    (tmp_path / "copy.yaml").write_text(yaml.safe_dump(data))
    adapter = make_adapter(base, s, tmp_path / "on-copy", seed=3)
    tok = json.loads((base / "tokenizer.json").read_text())
    tok["added_tokens"].append({**tok["added_tokens"][-1], "id": len(tok["model"]["vocab"]), "content": "<|new|>"})
    (base / "tokenizer.json").write_text(json.dumps(tok))
    train = training_run(s, "tok", adapter)
    with pytest.raises(CandidateRejected, match="trained on base|tokenizer"):
        pipeline.evaluate_adapter("tok", str(tmp_path / "copy.yaml"), train, settings=s)

    assert registry.version_by_alias("champion") is None
    assert registry.version_for_run(train["run_id"]) is None  # never registered, never promoted


@pytest.mark.integration
def test_evaluation_twice_gives_the_same_scores_and_decision(shoefix_env, tiny_model, tiny_recipe, tmp_path):
    from shoefix_tasks.config import load_recipe
    from shoefix_tasks.evaluation.evaluate import evaluate
    from shoefix_tasks.evaluation.gate import Scorecard, decide

    s = shoefix_env
    tracking.configure(s)
    rec = load_recipe(str(tiny_recipe))
    adapter = make_adapter(tiny_model, s, tmp_path / "cand", seed=7)
    champion = make_adapter(tiny_model, s, tmp_path / "champ", seed=8)
    runs = [json.loads(Path(evaluate(s, rec, key, adapter, champion, "v1", "train-x")["evaluation_path"]).read_text())
            for key in ("twice-1", "twice-2")]

    def answers(ev, side):
        return [(x["id"], x["answer"], x["new_tokens"], {k: v for k, v in x.items() if k not in ("answer",)})
                for x in ev[side]["scores"]]

    for side in ("champion", "challenger"):
        assert answers(runs[0], side) == answers(runs[1], side)
        quality = {k: v for k, v in runs[0][side]["summary"].items() if not k.startswith("latency_")}
        assert quality == {k: v for k, v in runs[1][side]["summary"].items() if not k.startswith("latency_")}
    assert runs[0]["holdout_hash"] == runs[1]["holdout_hash"]

    # the decision: identical, given the same latency figures (wall time is the one input that is
    # measured, not computed; docs/RELIABILITY.md says how close to the bound it may flip)
    def card(ev, side, p50):
        sc = ev[side]["scores"]
        return Scorecard({x["id"]: x["composite"] for x in sc}, {x["id"]: x["key_data_accuracy"] for x in sc}, p50,
                         frozenset(ev["guard_ids"]))

    p50 = runs[0]["champion"]["summary"]["latency_p50_s"]
    import yaml

    from shoefix_tasks.policy import load_policy, policy_from_dict
    from tests.conftest import LENIENT_POLICY

    # the production (built-in) gate, and the test-only lenient one
    for gate in (load_policy().gate, policy_from_dict(yaml.safe_load(LENIENT_POLICY.read_text())).gate):
        one, two = (decide(card(ev, "champion", p50), card(ev, "challenger", p50), gate) for ev in runs)
        assert one == two
