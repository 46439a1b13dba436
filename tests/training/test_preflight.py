"""GPU preflight: the decision with injected probe results, the real probes on this CPU machine,
and the exit-code path from the trainer CLI to a task that fails without retries."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from shoefix_tasks.config import load_recipe
from shoefix_tasks.errors import EXIT_PREFLIGHT
from shoefix_tasks.training import preflight
from shoefix_tasks.training.preflight import GIB, GpuProbe, Needs, PreflightError, check_node, decide
from tests.conftest import ROOT

H200 = GpuProbe(True, "NVIDIA H200", free_bytes=140 * GIB, total_bytes=141 * GIB)


def _never():
    raise AssertionError("a CPU recipe must not probe the GPU")


def test_which_recipes_need_a_gpu():
    assert not preflight.needs_cuda(load_recipe("default"), gpu_node=False)
    assert preflight.needs_cuda(load_recipe("default"), gpu_node=True)  # a declared GPU node is checked anyway
    for name in ("qwen2.5-0.5b-gpu", "qwen2.5-1.5b-gpu", "qlora-gpu", "seed"):
        assert preflight.needs_cuda(load_recipe(name), gpu_node=False), name
    assert preflight.uses_bitsandbytes(load_recipe("qlora-gpu"))  # 4-bit NF4 base
    assert preflight.uses_bitsandbytes(load_recipe("seed"))  # adamw_8bit
    assert not preflight.uses_bitsandbytes(load_recipe("qwen2.5-0.5b-gpu"))


def test_cpu_recipe_skips_the_probes(shoefix_env, monkeypatch):
    monkeypatch.delenv("SHOEFIX_REQUIRE_GPU", raising=False)
    assert check_node(load_recipe("default"), shoefix_env, gpu_probe=_never, bnb_probe=_never) == {"skipped": True}


def test_decision():
    needs = Needs(cuda=True, bitsandbytes=True, min_bytes=8 * GIB)
    assert decide(needs, H200, None) == []
    assert decide(Needs(False, False, 0), None, None) == []
    [msg] = decide(needs, GpuProbe(False, error="torch.cuda.is_available() is False"), None)
    assert "needs a CUDA GPU" in msg and "is_available" in msg
    [msg] = decide(needs, dataclasses.replace(H200, free_bytes=6 * GIB), None)
    assert "6.0 GiB free" in msg and "~8.0 GiB" in msg
    [msg] = decide(needs, H200, "RuntimeError: no kernel image for sm_90")
    assert "bitsandbytes does not work on NVIDIA H200" in msg
    assert decide(dataclasses.replace(needs, bitsandbytes=False), H200, "broken") == []  # not used: not checked
    assert len(decide(needs, dataclasses.replace(H200, free_bytes=GIB), "broken")) == 2


def test_memory_estimate_arithmetic():
    """Qwen2.5-1.5B shape, bf16, 1024 tokens: weights 3.09 GB + activations 1.50 GB + logits 1.24 GB,
    x1.1, + 1 GiB context (the docstring's example)."""
    rec = load_recipe("qwen2.5-1.5b-gpu")
    cfg = {"hidden_size": 1536, "num_hidden_layers": 28, "vocab_size": 151936}
    params = 1_543_714_304
    expected = int((params * 2 + 1024 * 1536 * 34 * 28 + 1024 * 151936 * 8) * 1.1) + GIB
    assert preflight.estimate_min_bytes(rec, params, cfg) == expected
    qlora = load_recipe("qlora-gpu")
    assert preflight.estimate_min_bytes(qlora, params, cfg) < expected  # 4-bit weights
    ckpt = dataclasses.replace(rec, train=dataclasses.replace(rec.train, gradient_checkpointing=True))
    assert preflight.estimate_min_bytes(ckpt, params, cfg) < expected  # only layer inputs kept


def test_gpu_recipe_on_a_local_base(shoefix_env, tiny_model, monkeypatch):
    """The estimate comes from the base's real safetensors headers and config; probes injected."""
    from transformers import AutoModelForCausalLM

    monkeypatch.delenv("SHOEFIX_REQUIRE_GPU", raising=False)
    params = preflight.safetensors_param_count(tiny_model)
    assert params == AutoModelForCausalLM.from_pretrained(tiny_model).num_parameters()
    rec = load_recipe("qlora-gpu", [f"model.base_model={tiny_model}"])
    called = []

    def bnb_ok():
        called.append(1)
        return None

    report = check_node(rec, shoefix_env, gpu_probe=lambda: H200, bnb_probe=bnb_ok)
    config = __import__("json").loads((tiny_model / "config.json").read_text())
    needed = preflight.estimate_min_bytes(rec, params, config)
    assert report["problems"] == [] and called == [1] and report["needs_gib"] == round(needed / GIB, 1)
    assert GIB < needed < 2 * GIB  # the CUDA context dominates a 2-layer model
    tight = dataclasses.replace(H200, free_bytes=512 << 20)  # 0.5 GiB free: less than the CUDA context alone
    with pytest.raises(PreflightError, match="GiB free"):
        check_node(rec, shoefix_env, gpu_probe=lambda: tight, bnb_probe=bnb_ok)
    with pytest.raises(PreflightError, match="bitsandbytes"):
        check_node(rec, shoefix_env, gpu_probe=lambda: H200, bnb_probe=lambda: "ImportError: no libbitsandbytes")
    # a recipe with Liger kernels: the real probe (liger-kernel is not installed on this CPU machine)
    # makes the node unfit, with the reason
    liger = load_recipe("qwen2.5-1.5b-gpu", [f"model.base_model={tiny_model}", "train.use_liger_kernel=true"])
    with pytest.raises(PreflightError, match="Liger kernels"):
        check_node(liger, shoefix_env, gpu_probe=lambda: H200, bnb_probe=bnb_ok)
    assert check_node(liger, shoefix_env, gpu_probe=lambda: H200, bnb_probe=bnb_ok,
                      liger_probe=lambda: None)["problems"] == []


def test_real_probes_on_this_machine():
    """No GPU here: the real CUDA probe says so; bitsandbytes' real ops run on the CPU backend, and
    the probe reports the failure when asked to use a CUDA device that does not exist."""
    gpu = preflight.probe_gpu()
    assert gpu.cuda is False and "is_available() is False" in gpu.error
    assert preflight.probe_bitsandbytes("cpu") is None
    err = preflight.probe_bitsandbytes("cuda")
    assert err and "Error" in err


def test_cli_exits_78_before_touching_data(shoefix_env, tmp_path):
    """A GPU recipe on this CPU machine: exit code 78, and the (missing) snapshot is never read."""
    import subprocess

    from tests.conftest import env_with

    proc = subprocess.run([sys.executable, "-m", "shoefix_tasks.train", "--recipe", "qwen2.5-0.5b-gpu",
                           "--snapshot", str(tmp_path / "does-not-exist.jsonl"), "--run-key", "r1"],
                          env=env_with(shoefix_env), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == EXIT_PREFLIGHT, proc.stderr[-2000:]
    assert "GPU preflight failed" in proc.stderr and "does-not-exist" not in proc.stderr


def test_airflow_task_fails_without_retry(shoefix_env, monkeypatch, tmp_path):
    """train_adapter (the DAG task) turns the trainer's exit 78 into AirflowFailException."""
    import retrain_graph
    from airflow.sdk.exceptions import AirflowFailException

    from shoefix_tasks.pipeline import resolve_recipe

    resolved = resolve_recipe("manual__preflight", "qwen2.5-0.5b-gpu", [], shoefix_env)
    monkeypatch.setattr(retrain_graph, "_trigger", lambda: {"recipe": "qwen2.5-0.5b-gpu", "overrides": [], **resolved})
    monkeypatch.setattr(retrain_graph, "_run_key", lambda: "manual__preflight")
    with pytest.raises(AirflowFailException, match="cannot run recipe"):
        retrain_graph._train_adapter_task.function({"snapshot_path": str(tmp_path / "none.jsonl")})
