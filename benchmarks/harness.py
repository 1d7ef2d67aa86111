"""What the benchmarks share: the environment, timing statistics, the machine, capped calls, the seeded
workload and simulated decoding loop, compile/cache measurement, peers that more than one benchmark
runs, results files and plots.

Every benchmark is a script (``python benchmarks/NAME.py``) whose first import is ``import harness``
(its own folder is on ``sys.path``). Importing it sets the offline environment of ``make bench``
(never the network; numba's cache inside the repository) and puts the repository root on
``sys.path``, so a checkout without ``pip install -e .`` runs too and ``tests.support`` (the oracles,
the adversary, the corpora) imports. It imports nothing heavy: numpy, torch and safedecode load in
the functions that need them, after a script has set its own environment.
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("NUMBA_CACHE_DIR", str(REPO / ".cache" / "numba"))
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`; tests.support
    sys.path.insert(0, str(REPO))

SEED = 20240607

# Ten secret-like regexes. Kept to the syntax both engines give the same meaning: ASCII classes
# ([0-9], not \d, which is Unicode in the `regex` package) and no \b (llguidance has no look-around).
REGEXES = [
    r"sk-[A-Za-z0-9]{20,}",                              # OpenAI-style API key
    r"AKIA[0-9A-Z]{16}",                                 # AWS access key id
    r"ghp_[A-Za-z0-9]{36}",                              # GitHub personal access token
    r"[0-9]{3}-[0-9]{2}-[0-9]{4}",                       # US SSN
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",               # PEM private key header
    r"xox[baprs]-[0-9A-Za-z-]{10,}",                     # Slack token
    r"sk_live_[0-9a-zA-Z]{24}",                          # Stripe live secret key
    r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+\.[A-Za-z]{2,}",    # e-mail address
    r"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}",   # IPv4 address
    r"[Pp]assword *[:=] *[^ \n]+",                       # "password: <value>"
]


def one_omp_thread() -> None:
    """One OpenMP thread unless ``OMP_NUM_THREADS`` says otherwise (call before torch is imported):
    on a small shared machine torch's threads spin-wait on each other and generation gets several
    times slower (see tests/conftest.py)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")


# ------------------------------------------------------------------------------ timing and numbers
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def summary(samples_ns) -> dict:
    """Percentiles, mean and range (µs) of per-call times in ns."""
    import numpy as np

    a = np.asarray(samples_ns, dtype=np.float64) / 1e3
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "p50_us": float(np.percentile(a, 50)), "p99_us": float(np.percentile(a, 99)),
            "p10_us": float(np.percentile(a, 10)), "mean_us": float(a.mean()), "min_us": float(a.min()),
            "max_us": float(a.max())}


def fmt_us(x) -> str:
    if x is None:
        return "—"
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def run_with_cap(fn, cap_s: float):
    """Run ``fn()`` in a daemon thread; (result, error, seconds), or (None, 'timeout: ...', None) if it
    exceeds ``cap_s``.

    For work that drops the GIL and cannot be interrupted (llguidance grammar construction, large
    compiles): on a timeout the thread is abandoned (it dies with the process) and the run goes on.
    """
    box = {}

    def target():
        t0 = time.perf_counter()
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported, not raised
            box["error"] = f"{type(exc).__name__}: {exc}"
        box["seconds"] = time.perf_counter() - t0

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(cap_s)
    if thread.is_alive():
        return None, f"timeout: still running after {cap_s:.0f} s (abandoned)", None
    return box.get("result"), box.get("error"), box.get("seconds")


def machine_info(torch_threads: int) -> dict:
    """The CPU, the versions that matter, the commit, the date and the load average at start."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    versions = {"python": platform.python_version()}
    for name in ("safedecode", "torch", "transformers", "tokenizers", "llguidance", "numba", "numpy", "matplotlib"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "?")
        except Exception:  # noqa: BLE001
            versions[name] = "not installed"
    commit = None
    try:  # read-only
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except Exception:  # noqa: BLE001
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {"cpu_model": cpu, "logical_cores": os.cpu_count(), "usable_cores": affinity,
            "platform": platform.platform(), "versions": versions, "git_commit": commit,
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "torch_threads": torch_threads, "loadavg_start": list(os.getloadavg())}


# ------------------------------------------------------------------------------ results and plots
def write_json(path: Path, data, *, indent: int = 1, ensure_ascii: bool = True, newline: bool = False) -> None:
    """``data`` as JSON (values it cannot serialize as their ``str``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=indent, ensure_ascii=ensure_ascii, default=str)
    path.write_text(text + ("\n" if newline else ""))


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


# ------------------------------------------------------------------------------ workload (seeded)
def vocabulary_words(tok) -> list[str]:
    """Lower-case words of 5-12 letters that are whole tokens with a leading space (Ġ), skipping the
    1,000 lowest ids (the most frequent merges: 'which', 'their'...), sorted for determinism."""
    import re

    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    return sorted({t[1:] for i, t in enumerate(tokens)
                   if i >= 1000 and isinstance(t, str) and re.fullmatch(r"Ġ[a-z]{5,12}", t)})


def make_phrases(words: list[str], n: int, seed: int) -> list[str]:
    """``n`` distinct phrases of 1-3 words; the first is 'password' (the leak-check example).
    Policies of size k use the first k phrases, so the policies are nested."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out, seen = ["password"], {"password"}
    while len(out) < n:
        k = int(rng.integers(1, 4))
        phrase = " ".join(str(w) for w in rng.choice(words, k))
        if phrase not in seen:
            seen.add(phrase)
            out.append(phrase)
    return out


def secret_like(rng) -> str:
    """A string of one of the shapes :data:`REGEXES` forbids, often cut short (numpy ``rng``)."""
    alnum = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    upper = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

    def draw(alphabet, lo, hi):
        return "".join(rng.choice(list(alphabet), int(rng.integers(lo, hi + 1))))

    def digits(n):
        return "".join(str(int(d)) for d in rng.integers(0, 10, n))

    kind = int(rng.integers(0, 10))
    return [
        lambda: f"sk-{draw(alnum, 6, 30)}",
        lambda: f"AKIA{draw(upper, 8, 18)}",
        lambda: f"ghp_{draw(alnum, 10, 40)}",
        lambda: f"{digits(3)}-{digits(2)}-{digits(4)}",
        lambda: "-----BEGIN RSA PRIVATE KEY-----",
        lambda: f"xoxb-{draw(alnum, 4, 16)}",
        lambda: f"sk_live_{draw(alnum, 8, 26)}",
        lambda: f"{draw('abcdefghij', 3, 8)}@example.com",
        lambda: f"10.{int(rng.integers(0, 256))}.{int(rng.integers(0, 256))}.{int(rng.integers(0, 256))}",
        lambda: f"password: {draw(alnum, 4, 12)}",
    ][kind]()


def make_script(tok, words, phrases, n_tokens: int, seed: int) -> list[int]:
    """Token ids of an English-like text: vocabulary words, policy phrases (whole and cut short) and
    secret-like strings. Decoding follows it wherever the processor allows (see :func:`run_stream`)."""
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    parts = []
    ids: list[int] = []
    while len(ids) < n_tokens:
        for _ in range(200):
            u = rng.random()
            if u < 0.55:
                parts.append(str(rng.choice(words)))
            elif u < 0.63:
                parts.append(phrases[int(rng.integers(0, min(10, len(phrases))))])
            elif u < 0.70:
                parts.append(phrases[int(rng.integers(0, len(phrases)))])
            elif u < 0.80:
                p = phrases[int(rng.integers(0, len(phrases)))]
                parts.append(p[: int(rng.integers(1, len(p)))])
            else:
                parts.append(secret_like(rng))
            parts.append(str(rng.choice([" ", " ", " ", " ", ", ", ". ", "\n"])))
        ids = tok.encode("".join(parts), add_special_tokens=False)
    return ids[:n_tokens]


def prompt_ids(tok) -> list[int]:
    """A chat prompt (the tokenizer's template, else the plain message)."""
    messages = [{"role": "user", "content": "Write the release notes and the deployment checklist for the ops team."}]
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tok.encode(text, add_special_tokens=False)
    except Exception:  # noqa: BLE001
        return tok.encode(messages[0]["content"], add_special_tokens=False)


def random_logits(rounds: int, batch: int, width: int, eos_ids, seed: int):
    """``rounds`` sets of random logits (rounds, batch, width), EOS at -inf so every stream runs its
    full length."""
    import torch

    bases = torch.randn((rounds, batch, width), generator=torch.Generator().manual_seed(seed)) * 4.0
    eos = [i for i in eos_ids if i is not None]
    if eos:
        bases[:, :, eos] = float("-inf")
    return bases


# ------------------------------------------------------------------------------ the decoding loop
def run_stream(proc, *, batch, prompt, script, bases, warmup, steps, cap_s, desc):
    """Simulated decoding: each step copies fresh random logits into the scores (timed apart), calls
    the processor (timed), then appends per row the script's next token if the processor left it
    allowed, else the argmax. Returns timings (ns per step), copies (ns) and what happened."""
    import torch
    from tqdm import tqdm

    rows = batch
    ids = torch.tensor([prompt] * rows, dtype=torch.long)
    scores = torch.empty((rows, bases.shape[-1]), dtype=bases.dtype)
    n_script = len(script)
    stride = 97
    want_all = torch.tensor([[script[(r * stride + s) % n_script] for s in range(warmup + steps)]
                             for r in range(rows)], dtype=torch.long)
    calls, copies = [], []
    blocked = 0
    error = None
    capped = False
    t_start = time.perf_counter()
    bar = tqdm(total=warmup + steps, desc=desc, leave=False, mininterval=1.0, file=sys.stderr)
    gc.collect()
    gc.disable()
    try:
        for step in range(warmup + steps):
            c0 = time.perf_counter_ns()
            scores.copy_(bases[step % bases.shape[0], :rows])
            c1 = time.perf_counter_ns()
            out = proc(ids, scores)
            c2 = time.perf_counter_ns()
            if step >= warmup:
                calls.append(c2 - c1)
                copies.append(c1 - c0)
            want = want_all[:, step]
            ok = torch.isfinite(out.gather(1, want[:, None]).squeeze(1))
            if not bool(ok.all()):
                blocked += int((~ok).sum())
                nxt = torch.where(ok, want, out.argmax(-1))
            else:
                nxt = want
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            bar.update(1)
            if time.perf_counter() - t_start > cap_s:
                capped = step + 1 < warmup + steps
                break
    except Exception as exc:  # noqa: BLE001 - recorded in the results
        error = f"{type(exc).__name__}: {exc}"
    finally:
        gc.enable()
        bar.close()
    return {"calls_ns": calls, "copies_ns": copies, "blocked_tokens": blocked, "error": error,
            "capped": capped, "wall_s": time.perf_counter() - t_start,
            "generated": ids[:, len(prompt):].tolist()}


def stream_record(run: dict) -> dict:
    """The numbers of one :func:`run_stream` that go into the results (samples in µs)."""
    return {"summary": summary(run["calls_ns"]), "copy_summary": summary(run["copies_ns"]),
            "blocked_tokens": run["blocked_tokens"], "error": run["error"], "capped": run["capped"],
            "wall_s": run["wall_s"], "calls_us": [round(x / 1e3, 3) for x in run["calls_ns"]]}


def stream_status(run: dict) -> str:
    """' ERROR: …', ' (capped)' or '' for a log line."""
    return f" ERROR: {run['error'][:120]}" if run["error"] else (" (capped)" if run["capped"] else "")


# ------------------------------------------------------------------------------ safedecode
def clear_memory_cache() -> None:
    """Empty safedecode's in-process compiled-policy cache (a private detail: tolerate its absence)."""
    import safedecode.engine.compiled as sd_compiled

    cache = getattr(sd_compiled, "_memory_cache", None)
    if cache is not None:
        cache.clear()


def tiny_policy_compiled(compile_on):
    """A one-phrase policy, compiled without caches: the first use of the compiler."""
    import safedecode

    return safedecode.compile_policy(safedecode.Policy(forbid=[{"literal": "zebra crossing"}]), compile_on,
                                     cache_dir=False)


def warm_kernels(compiled, prompt, width: int, batches) -> None:
    """Load/compile every numba signature the runs use (per logits width and batch size)."""
    import safedecode
    import torch

    for rows in batches:
        warm = safedecode.SafeLogitsProcessor(compiled)
        ids = torch.tensor([prompt] * rows)
        for _ in range(3):
            warm(ids, torch.zeros((rows, width)))
            ids = torch.cat([ids, ids[:, -1:]], dim=1)


def safedecode_compile(policy, tok, tmp_root: Path) -> tuple[object, dict]:
    """Cold compile (no caches), then a disk-cache round trip; returns (compiled, numbers)."""
    import safedecode
    import safedecode.engine.compiled as sd_compiled
    from safedecode.tokens.vocabulary import vocabulary_of

    info: dict = {}
    clear_memory_cache()
    gc.collect()
    t0 = time.perf_counter()
    compiled = safedecode.compile_policy(policy, tok, cache_dir=False)
    info["cold_compile_s"] = time.perf_counter() - t0
    info["stats"] = {k: v for k, v in compiled.stats.items() if k != "component_rules"}
    # Write the disk cache without compiling twice (private helper; fall back to a second compile).
    disk = Path(tempfile.mkdtemp(prefix="sd-cache-", dir=tmp_root))
    try:
        key = sd_compiled.cache_key(policy, vocabulary_of(tok), sd_compiled.DEFAULT_MAX_STATES)
        sd_compiled._store(disk, key, compiled)
        info["cache_written_by"] = "_store"
    except Exception:  # noqa: BLE001
        clear_memory_cache()
        t0 = time.perf_counter()
        safedecode.compile_policy(policy, tok, cache_dir=disk)
        info["cache_written_by"] = "compile_policy(cache_dir=...)"
        info["compile_and_store_s"] = time.perf_counter() - t0
    loads, misses = [], 0
    for _ in range(4):
        clear_memory_cache()
        t0 = time.perf_counter()
        loaded = safedecode.compile_policy(policy, tok, cache_dir=disk)
        seconds = time.perf_counter() - t0
        if loaded.stats.get("loaded_from_cache"):
            loads.append(seconds)
        else:  # the file was not usable (e.g. the private _store wrote another key): this call wrote it
            misses += 1
            info["cache_written_by"] = "compile_policy(cache_dir=...)"
        del loaded
        if len(loads) == 3:
            break
    info["cached_load_s"] = loads  # only the loads that hit the disk cache
    info["cached_load_misses"] = misses
    info["cached_load_hit"] = bool(loads)
    info["cache_file_bytes"] = sum(p.stat().st_size for p in disk.glob("*.npz"))
    shutil.rmtree(disk, ignore_errors=True)
    clear_memory_cache()
    return compiled, info


# ------------------------------------------------------------------------------ xgrammar (a peer)
class XGrammarProcessor:
    """A minimal per-step xgrammar processor (B=1): accept the last token, fill the bitmask, apply it."""

    def __init__(self, xgr, compiled, vocab_size):
        self.xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.started = False

    def __call__(self, input_ids, scores):
        if self.started:
            tok = int(input_ids[0, -1])
            if not self.matcher.accept_token(tok):
                raise RuntimeError(f"xgrammar refused token {tok}")
        self.started = True
        self.matcher.fill_next_token_bitmask(self.bitmask)
        self.xgr.apply_token_bitmask_inplace(scores, self.bitmask)
        return scores


def xgrammar_build(tok, phrases: list[str], cap_s: float):
    """xgrammar's literal ban: the structural tag ``any_text`` with ``excludes=phrases``, compiled by
    a single-threaded ``GrammarCompiler`` without its cache, under ``cap_s`` seconds.

    Returns (a factory of fresh B=1 ``XGrammarProcessor``s, or None; numbers). ``info["skipped"]`` is
    set when xgrammar is not importable, ``info["error"]`` when the compile fails or is capped."""
    import torch

    info: dict = {"phrases": len(phrases)}
    try:
        import importlib.metadata

        import xgrammar as xgr

        info["version"] = importlib.metadata.version("xgrammar")
    except Exception as exc:  # noqa: BLE001 - an optional peer
        info["skipped"] = f"xgrammar not importable: {type(exc).__name__}: {exc}"
        return None, info
    V = len(tok)
    t0 = time.perf_counter()
    tok_info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=V)
    info["tokenizer_info_s"] = time.perf_counter() - t0
    compiler = xgr.GrammarCompiler(tok_info, max_threads=1, cache_enabled=False)
    tag = {"type": "structural_tag", "format": {"type": "any_text", "excludes": list(phrases)}}
    info["grammar"] = 'structural tag {"type": "any_text", "excludes": [phrases]}; GrammarCompiler(max_threads=1)'
    compiled, err, seconds = run_with_cap(lambda: compiler.compile_structural_tag(tag), cap_s)
    info["compile_s"] = seconds
    if err is not None:
        info["error"] = err
        return None, info
    for _ in range(2):  # warm-up of the apply kernel
        xgr.apply_token_bitmask_inplace(torch.zeros((1, V)), xgr.allocate_token_bitmask(1, V))
    return (lambda: XGrammarProcessor(xgr, compiled, V)), info


def xgrammar_version() -> str:
    try:
        import importlib.metadata

        return importlib.metadata.version("xgrammar")
    except Exception:  # noqa: BLE001
        return "not installed"


# ------------------------------------------------ structured outputs: the schemas of structured.py
ADDRESS = {
    "type": "object",
    "properties": {
        "street": {"type": "string"},
        "city": {"type": "string"},
        "postal_code": {"type": "string", "pattern": "^[0-9]{5}$"},
        "country": {"type": "string", "enum": ["US", "CA", "GB", "DE", "FR"]},
    },
    "required": ["street", "city", "postal_code", "country"],
    "additionalProperties": False,
}

PERSON = {
    "title": "Person",
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 64},
        "email": {"type": "string", "format": "email"},
        "age": {"type": "integer"},
        "phone": {"type": "string", "pattern": "^\\+[0-9]{7,15}$"},
        **ADDRESS["properties"],
    },
    "required": ["name", "email", "age", "phone", "street", "city", "postal_code", "country"],
    "additionalProperties": False,
}

ORDER = {
    "title": "Order",
    "type": "object",
    "$defs": {"address": ADDRESS},
    "properties": {
        "order_id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
        "customer": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "email": {"type": "string", "format": "email"},
                           "tier": {"type": "string", "enum": ["standard", "gold", "platinum"]}},
            "required": ["name", "email", "tier"], "additionalProperties": False},
        "items": {
            "type": "array", "minItems": 1, "maxItems": 20,
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                               "quantity": {"type": "integer"}, "unit_price": {"type": "number"},
                               "category": {"type": "string", "enum": ["books", "electronics", "garden", "toys"]}},
                "required": ["sku", "quantity", "unit_price", "category"], "additionalProperties": False}},
        "shipping": {
            "type": "object",
            "properties": {"method": {"type": "string", "enum": ["standard", "express", "pickup"]},
                           "address": {"$ref": "#/$defs/address"}},
            "required": ["method", "address"], "additionalProperties": False},
        "status": {"type": "string", "enum": ["pending", "paid", "shipped", "cancelled"]},
        "gift": {"type": "boolean"},
    },
    "required": ["order_id", "customer", "items", "shipping", "status", "gift"],
    "additionalProperties": False,
}

ISSUE_TOOL_CALL = {
    "title": "create_issue call",
    "type": "object",
    "properties": {
        "name": {"const": "create_issue"},
        "arguments": {
            "type": "object",
            "properties": {
                "repository": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,39}/[A-Za-z0-9_.-]{1,100}$"},
                "title": {"type": "string", "minLength": 1, "maxLength": 120},
                "body": {"type": "string"},
                "labels": {"type": "array", "maxItems": 5,
                           "items": {"type": "string",
                                     "enum": ["bug", "enhancement", "documentation", "question", "good first issue"]}},
                "assignee": {"anyOf": [{"type": "string", "pattern": "^[A-Za-z0-9-]{1,39}$"}, {"type": "null"}]},
                "milestone": {"type": "integer"},
                "due_on": {"type": "string", "format": "date"},
            },
            "required": ["repository", "title", "body"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "arguments"],
    "additionalProperties": False,
}

# The walked documents: valid instances, spelled as json.dumps does (", " and ": "), which every
# engine's whitespace rule accepts; only the escapes \" and \\ (all safedecode's grammar allows).
# A \" escape sits in a string field WITHOUT maxLength (see PROBES: xgrammar refuses escapes in
# strings that have a maxLength).
DOCUMENTS = {
    "person": {"name": "Ada Lovelace", "email": "ada.lovelace@example.org", "age": 36,
               "phone": "+442079460958", "street": "12 \"Old\" St James's Square", "city": "London",
               "postal_code": "10115", "country": "GB"},
    "order": {"order_id": "ORD-004217",
              "customer": {"name": "Grace Hopper", "email": "grace@navy.example.mil", "tier": "gold"},
              "items": [{"sku": "BKS-0042", "quantity": 2, "unit_price": 39.95, "category": "books"},
                        {"sku": "ELC-1337", "quantity": 1, "unit_price": 249.0, "category": "electronics"},
                        {"sku": "GRD-0007", "quantity": 12, "unit_price": 3.5, "category": "garden"}],
              "shipping": {"method": "express",
                           "address": {"street": "1 Main Street", "city": "Arlington", "postal_code": "22201",
                                       "country": "US"}},
              "status": "paid", "gift": False},
    "issue": {"name": "create_issue",
              "arguments": {"repository": "acme-corp/safedecode",
                            "title": "Tokenizer cache is rebuilt on every request",
                            "body": "Steps: start the server, send two requests. The second one logs "
                                    "\"building vocabulary\" again; expected it to be cached. Version 0.9.1.",
                            "labels": ["bug", "good first issue"],
                            "due_on": "2025-03-31"}},
}

SCHEMAS = {"person": PERSON, "order": ORDER, "issue": ISSUE_TOOL_CALL}
