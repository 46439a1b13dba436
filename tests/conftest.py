"""Shared fixtures: an isolated ShoeFix state folder, and a tiny random model built offline.

No test touches a model hub: the tiny model's tokenizer is a byte-level BPE trained in
milliseconds on the fixture corpus, and its weights are random (seeded).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
DATA = ROOT / "data"  # the shipped corpus, holdout, guard set and claims
LENIENT_POLICY = FIXTURES / "policy" / "lenient.yaml"  # test-only: a gate any non-tied challenger passes

# Airflow reads its configuration at import: point it at our DAGs and a throwaway home before
# any test imports it (never the user's ~/airflow).
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="shoefix-airflow-"))
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(ROOT / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_k] = "1"
# One torch (OpenMP) thread per process, set before anything imports torch, and inherited by every
# subprocess (trainer, `airflow dags test`, `shoefix serve`, the stack's services): the tests run
# tiny models on three xdist workers sharing two cores, where a second intra-op thread only contends
# with the other workers' processes. Oversubscribed, a tiny model's training step took ~1 s instead
# of ~40 ms (the race test's 330-step training: minutes instead of seconds).
os.environ.setdefault("OMP_NUM_THREADS", "1")
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def build_tiny_model(folder: Path, seed: int = 0, hidden: int = 64) -> Path:
    """A 2-layer Llama with a ChatML tokenizer, saved as safetensors in `folder`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from shoefix_tasks.model.prompting import SYSTEM_PROMPT

    texts = [SYSTEM_PROMPT]
    for path in [FIXTURES / "corpus_small.jsonl", *sorted((FIXTURES / "data").rglob("*.jsonl"))]:
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            texts += [rec["question"], rec["answer"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    return folder


def session_folder(tmp_path_factory, name: str, build) -> Path:
    """`<session tmp>/shared/<name>`, filled by `build(folder)` once per test session: under
    pytest-xdist the workers share it (a file lock; the first one builds, the others wait and reuse)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(exist_ok=True)
    folder = root / name
    with FileLock(f"{folder}.lock"):
        if not (folder / ".complete").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".complete").touch()
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return session_folder(tmp_path_factory, "tiny", lambda d: build_tiny_model(d / "tiny-llama")) / "tiny-llama"


@pytest.fixture(scope="session")
def airflow_db_template(tmp_path_factory) -> Path:
    """A metadata DB made by a real `airflow db migrate` (SQLite), once per session: each test
    copies it (`airflow_home`) instead of migrating again (~10 s each)."""
    def migrate(folder: Path) -> None:
        env = {**os.environ, "AIRFLOW_HOME": str(folder),
               "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{folder}/airflow.db"}
        proc = subprocess.run(["airflow", "db", "migrate"], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]

    return session_folder(tmp_path_factory, "airflow-db", migrate) / "airflow.db"


def fresh_airflow_home(home: Path, template: Path) -> Path:
    """`home` with a copy of the migrated metadata DB as `home/airflow.db`."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, home / "airflow.db")
    return home


@pytest.fixture()
def airflow_home(tmp_path, airflow_db_template) -> Path:
    """`<tmp>/airflow`: an AIRFLOW_HOME whose `airflow.db` is migrated (a copy of the session's)."""
    return fresh_airflow_home(tmp_path / "airflow", airflow_db_template)


def airflow_env(settings, home: Path, **extra) -> dict[str, str]:
    """The environment of an `airflow` CLI process over the test's state and `home/airflow.db`."""
    return env_with(settings, AIRFLOW_HOME=home, AIRFLOW__CORE__DAGS_FOLDER=ROOT / "dags",
                    AIRFLOW__CORE__LOAD_EXAMPLES="False",
                    AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home}/airflow.db", **extra)


@pytest.fixture()
def shoefix_env(tmp_path, monkeypatch):
    """A fresh state folder with the fixture holdout/guard; returns Settings."""
    from shoefix_tasks.config import Settings

    home = tmp_path / "var"
    (home / "inbox").mkdir(parents=True)
    monkeypatch.setenv("SHOEFIX_HOME", str(home))
    monkeypatch.setenv("SHOEFIX_DATA_DIR", str(FIXTURES / "data"))
    monkeypatch.delenv("SHOEFIX_INBOX", raising=False)
    monkeypatch.delenv("SHOEFIX_LEDGER_URL", raising=False)
    monkeypatch.delenv("SHOEFIX_POLICY", raising=False)  # the built-in (production) policy unless a test sets one
    monkeypatch.delenv("SHOEFIX_TRUNCATED_GRACE_S", raising=False)  # the default grace unless a test sets one
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home}/mlflow/mlflow.db")
    settings = Settings.from_env()
    if "mlflow" in sys.modules:  # MLflow keeps process-global URIs: never let a test see the last one's store
        sys.modules["mlflow"].set_tracking_uri(settings.tracking_uri)
        sys.modules["mlflow"].set_registry_uri(settings.tracking_uri)
    return settings


def write_tiny_recipe(folder: Path, model: Path, name: str = "tiny", **train) -> Path:
    """The default recipe pointed at the tiny model, sized for seconds on a CPU: `<folder>/<name>.yaml`,
    so that with `folder` in the policy's `trigger.recipe_dirs` a trigger can name it."""
    import yaml

    data = yaml.safe_load((ROOT / "shoefix_tasks" / "recipes" / "default.yaml").read_text())
    data["model"]["base_model"] = str(model)
    data["train"].update({"num_train_epochs": 3, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                          "learning_rate": 5e-3,
                          "save_steps": 2, "max_length": 256, **train})
    data["eval"].update(max_new_tokens=12, batch_size=8)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture()
def tiny_recipe(tmp_path, tiny_model) -> Path:
    """`<tmp>/recipes/tiny.yaml` (recipe name `tiny` once a policy lists its folder)."""
    return write_tiny_recipe(tmp_path / "recipes", tiny_model)


def write_policy(path: Path, recipe_dirs=(), base: Path | None = LENIENT_POLICY, **sections) -> Path:
    """A server-side policy file for a test: `base` (None = the built-in defaults) with the given
    recipe folders in `trigger.recipe_dirs`, and `sections` ({"gate": {...}}) merged over it."""
    import yaml

    data = yaml.safe_load(base.read_text()) if base is not None else {}
    for section, values in {"trigger": {"recipe_dirs": [str(d) for d in recipe_dirs]}, **sections}.items():
        data.setdefault(section, {}).update(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture()
def lenient_policy(shoefix_env, tmp_path, tiny_recipe, monkeypatch) -> Path:
    """SHOEFIX_POLICY = the test-only lenient gate (tests/fixtures/policy/lenient.yaml) with the tiny
    recipe's folder as a recipe folder: integration tests that need a champion to exist (a random
    tiny model never wins a fair gate) use it, and name the recipe `tiny`. Set with monkeypatch, so
    `env_with` passes it to the Airflow / trainer subprocesses too."""
    from shoefix_tasks.policy import load_policy

    path = write_policy(tmp_path / "policy" / "lenient.yaml", [tiny_recipe.parent])
    monkeypatch.setenv("SHOEFIX_POLICY", str(path))
    assert load_policy().gate.min_effect == -100.0  # the file parses, and is the one in force
    return path


def copy_fixture_corpus(settings, name: str = "corpus_small.jsonl") -> Path:
    target = Path(settings.inbox) / name
    shutil.copyfile(FIXTURES / "corpus_small.jsonl", target)
    return target


def fixture_snapshot(settings, run: str = "r1") -> Path:
    """The fixture corpus through real intake (collect + GX validation): the training snapshot's path."""
    from shoefix_tasks.intake.collect import collect_batch
    from shoefix_tasks.intake.validate import validate_batch

    copy_fixture_corpus(settings)
    collect_batch(settings, run)
    return Path(validate_batch(settings, run).snapshot_path)


def dag_env(**extra) -> dict[str, str]:
    """The environment of a process that parses the DAG files: the repo's dags folder importable, as
    Airflow makes its configured dags folder (no sys.path edits in test code)."""
    path = os.pathsep.join([str(ROOT / "dags"), str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, **{k: str(v) for k, v in extra.items()}}


def env_with(settings, **extra) -> dict[str, str]:
    env = {**os.environ, "SHOEFIX_HOME": str(settings.home), "SHOEFIX_DATA_DIR": str(settings.data_dir),
           "MLFLOW_TRACKING_URI": settings.tracking_uri}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def work_unit(nodeid: str) -> str:
    """The pytest-xdist work unit of a test: `stack` for the full-stack tests (tests/stack: they build on
    one stack in file order), else its module (module fixtures such as the MLflow server start once)."""
    path = nodeid.split("::", 1)[0]
    return "stack" if path.startswith("tests/stack/") else path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Hand out whole work units (`work_unit`) in collection order. Our own scheduler rather than
    `--dist loadgroup` with `xdist_group` marks: xdist 3.8 records a group by rewriting
    `item._nodeid`, which pytest 9 no longer reads, so every test became a unit of its own and each
    worker started its own full stack."""
    from xdist.scheduler import LoadScopeScheduling

    class ByWorkUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return ByWorkUnit(config, log)


# The longest work units of a full run on the 2-core machine, longest first (only the order of the
# hand-out depends on it: a unit missing here is merely handed out later).
LONGEST_FIRST = ("stack", "tests/reliability/test_promotion_race.py", "tests/integration/test_promotion_review.py",
                 "tests/integration/test_weekly_dag_e2e.py", "tests/integration/test_registry_serving.py",
                 "tests/training/test_train_faults.py",
                 "tests/reliability/test_secrets.py", "tests/reliability/test_eval_faults.py",
                 "tests/dags/test_assets.py", "tests/reliability/test_registry_faults.py",
                 "tests/integration/test_plugin_page.py", "tests/intake/test_collect_validate.py")


def pytest_collection_modifyitems(config, items):
    """The order pytest-xdist hands out work units in (scripts/test.sh runs `-n 3 --dist loadscope
    --no-loadscope-reorder`; a plain serial `pytest` is left as it is): the stack unit first (long,
    and mostly waiting on the scheduler), then the other long units (`LONGEST_FIRST`), then modules
    with more `slow` tests, then the rest, so that the workers finish close together."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    groups: dict[str, list] = {}
    for item in items:
        groups.setdefault(work_unit(item.nodeid), []).append(item)

    def weight(name: str) -> tuple:
        rank = LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
        return (rank, -sum(1 for it in groups[name] if it.get_closest_marker("slow")))

    items[:] = [it for name in sorted(groups, key=weight) for it in groups[name]]  # stable within a unit
