from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from shoefix_tasks.config import Settings
from shoefix_tasks.model.adapter import AdapterIntegrityError, verify_adapter, write_manifest
from shoefix_tasks.model.base import BaseModelMismatch, check_compatible
from shoefix_tasks.training.factories import resolve_precision
from shoefix_tasks.training.train import last_complete_checkpoint, use_kernel_cache

BASE = {"name": "b", "spec": "b", "sha256": "a" * 64, "tokenizer_sha256": "t" * 64}


def make_adapter(folder):
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    (folder / "adapter_config.json").write_text("{}")
    write_manifest(folder, BASE)
    return folder


def test_manifest_round_trip(tmp_path):
    m = verify_adapter(make_adapter(tmp_path / "a"))
    assert set(m["files"]) == {"adapter_model.safetensors", "adapter_config.json"} and m["base"]["sha256"] == "a" * 64


def test_flipped_byte_is_refused(tmp_path):
    a = make_adapter(tmp_path / "a")
    data = bytearray((a / "adapter_model.safetensors").read_bytes())
    data[10] ^= 1
    (a / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(AdapterIntegrityError, match="sha256"):
        verify_adapter(a)


def test_pickle_is_refused(tmp_path):
    a = make_adapter(tmp_path / "a")
    (a / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterIntegrityError, match="pickle"):
        verify_adapter(a)
    b = tmp_path / "b"
    b.mkdir()
    (b / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(AdapterIntegrityError):
        write_manifest(b, BASE)


def test_missing_manifest_is_refused(tmp_path):
    a = make_adapter(tmp_path / "a")
    (a / "shoefix_manifest.json").unlink()
    with pytest.raises(AdapterIntegrityError, match="no shoefix_manifest"):
        verify_adapter(a)


def test_base_mismatch(tmp_path):
    check_compatible(BASE, dict(BASE), "x")
    with pytest.raises(BaseModelMismatch, match="trained on base"):
        check_compatible(BASE, {**BASE, "sha256": "c" * 64}, "x")
    with pytest.raises(BaseModelMismatch, match="tokenizer"):
        check_compatible(BASE, {**BASE, "tokenizer_sha256": "u" * 64}, "x")
    # an identity without hashes (a hub id resolved nowhere) never passes the check
    for key in ("sha256", "tokenizer_sha256"):
        with pytest.raises(BaseModelMismatch, match="missing"):
            check_compatible(BASE, {**BASE, key: ""}, "x")
        with pytest.raises(BaseModelMismatch, match="missing"):
            check_compatible({**BASE, key: ""}, BASE, "x")


def test_resume_picks_newest_complete_checkpoint(tmp_path):
    for step, complete in [(2, True), (4, True), (6, False)]:
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"w")
        if complete:
            (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-junk").mkdir()
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-4"
    assert last_complete_checkpoint(tmp_path / "nothing") is None


def test_precision_rule():
    assert resolve_precision("auto", cuda=True, bf16_supported=True) == (True, False)
    assert resolve_precision("auto", cuda=True, bf16_supported=False) == (False, True)
    assert resolve_precision("bf16", cuda=False, bf16_supported=True) == (True, False)  # CPU autocast, native bf16
    assert resolve_precision("bf16", cuda=False, bf16_supported=False) == (False, False)  # emulated: fp32
    assert resolve_precision("auto", cuda=False, bf16_supported=False) == (False, False)
    assert resolve_precision("fp16", cuda=False, bf16_supported=False) == (False, False)


def test_compiled_kernels_are_kept_on_the_state_volume_unless_the_operator_says_otherwise(tmp_path, monkeypatch):
    monkeypatch.setenv("SHOEFIX_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("TRITON_CACHE_DIR", "x")  # recorded, so teardown restores the worker's own value
    monkeypatch.delenv("TRITON_CACHE_DIR")
    use_kernel_cache(Settings.from_env())
    assert Path(os.environ["TRITON_CACHE_DIR"]) == (tmp_path / "state").resolve() / "cache" / "triton"
    monkeypatch.setenv("TRITON_CACHE_DIR", "/fast/local/triton")
    use_kernel_cache(Settings.from_env())
    assert os.environ["TRITON_CACHE_DIR"] == "/fast/local/triton"
