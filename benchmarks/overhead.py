#!/usr/bin/env python
"""Per-step overhead of safedecode's SafeLogitsProcessor next to its peers, in one run.

    .venv/bin/python benchmarks/overhead.py            # full run (`make bench`), ~5-10 min
    .venv/bin/python benchmarks/overhead.py --quick    # CI-sized run, ~1-2 min
    .venv/bin/python benchmarks/overhead.py --out DIR  # where to write overhead.{md,json,png}

What is measured (see benchmarks/README.md for the caveats):

* a simulated decoding loop on SmolLM2-135M's 49,152-token vocabulary, at batch 1 and 32: each step
  copies fresh random logits into the scores tensor (timed separately), calls the processor
  (timed), then appends one token per row: the next token of a scripted English-like text full of
  forbidden phrases and secret-like strings if the processor left it allowed, else the argmax of
  the processed scores. ``input_ids`` grows by one column per step, as in ``model.generate``;
* processors: none (an identity call), ``TemperatureLogitsWarper(0.7)``, ``NoBadWordsLogitsProcessor``
  (phrases only), llguidance (a Lark grammar that forbids the same phrases and regexes), and
  safedecode's ``SafeLogitsProcessor``;
* policies: 10, 100 and 1,000 phrases (seeded, drawn from words of the tokenizer's vocabulary),
  alone and together with 10 secret-like regexes (``+R``);
* safedecode compile time (cold: no in-process or disk cache), cached load time (in-process cache
  cleared, loaded from a disk cache) and table size; llguidance matcher creation time;
* a leak check: phrases spelled with other tokenizations than the ones ``bad_words_ids`` lists;
* leak and over-block rates under the adversarial driver of tests/test_adversarial.py (B=1, on the
  100 and 10+R policies): none, NoBadWords, llguidance, xgrammar ``excludes`` (literal phrases only;
  skipped if not importable) and safedecode, every verdict checked against the ``regex`` oracle.

Outputs: ``overhead.md`` (tables), ``overhead.json`` (every raw number, per-step samples included)
and ``overhead.png`` (p50 per step vs policy size).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Same environment as `make bench`: never touch the network; numba's cache inside the repo.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("NUMBA_CACHE_DIR", str(REPO / ".cache" / "numba"))

import numpy as np  # noqa: E402
import regex  # noqa: E402 - the policy's reference semantics (safedecode.find_violations uses it)
import torch  # noqa: E402

if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

import safedecode  # noqa: E402
import safedecode.engine.compiled as sd_compiled  # noqa: E402
from tests.oracle import text_of  # noqa: E402 - DESIGN §1's text of a byte string, as the tests define it

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

TARGETS = {"p50_us": 5.0, "p99_us": 25.0, "speedup_vs_llguidance": 50.0, "compile_s": 1.0, "cached_load_ms": 50.0}

PROCESSORS = ["none", "temperature", "nobadwords", "llguidance", "safedecode"]
LABELS = {"none": "none (identity call)", "temperature": "TemperatureLogitsWarper(0.7)",
          "nobadwords": "NoBadWordsLogitsProcessor", "llguidance": "llguidance", "xgrammar": "xgrammar (`excludes`)",
          "safedecode": "safedecode"}


# ------------------------------------------------------------------------------------------ utils
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pct(samples_ns, q) -> float | None:
    if samples_ns is None or len(samples_ns) == 0:
        return None
    return float(np.percentile(np.asarray(samples_ns, dtype=np.float64), q) / 1e3)


def summary(samples_ns) -> dict:
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


def clear_memory_cache() -> None:
    """Empty safedecode's in-process compiled-policy cache (a private detail: tolerate its absence)."""
    cache = getattr(sd_compiled, "_memory_cache", None)
    if cache is not None:
        cache.clear()


def run_with_cap(fn, cap_s: float):
    """Run ``fn()`` in a daemon thread; (result, error, seconds) or ('timeout') if it exceeds cap_s.

    Used for llguidance grammar construction, which drops the GIL and cannot be interrupted: on a
    timeout the thread is abandoned (it dies with the process) and the run goes on.
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


# ------------------------------------------------------------------------------ workload (seeded)
def vocabulary_words(tok) -> list[str]:
    """Lower-case words of 5-12 letters that are whole tokens with a leading space (Ġ), skipping the
    1,000 lowest ids (the most frequent merges: 'which', 'their'...), sorted for determinism."""
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    return sorted({t[1:] for i, t in enumerate(tokens)
                   if i >= 1000 and isinstance(t, str) and re.fullmatch(r"Ġ[a-z]{5,12}", t)})


def make_phrases(words: list[str], n: int, seed: int) -> list[str]:
    """``n`` distinct phrases of 1-3 words; the first is 'password' (the leak-check example).
    Policies of size k use the first k phrases, so the policies are nested."""
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
    secret-like strings. Decoding follows it wherever the processor allows (see run_stream)."""
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
    messages = [{"role": "user", "content": "Write the release notes and the deployment checklist for the ops team."}]
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tok.encode(text, add_special_tokens=False)
    except Exception:  # noqa: BLE001
        return tok.encode(messages[0]["content"], add_special_tokens=False)


def lark_escape(phrase: str) -> str:
    """Escape a literal for a regex inside Lark's /.../ (also escapes '/')."""
    return "".join("\\" + c if c in "\\.+*?()|[]{}^$#&-~/" else c for c in phrase)


def lark_grammar(phrases: list[str], regexes: list[str]) -> str:
    alternatives = [lark_escape(p) for p in phrases] + [r.replace("/", "\\/") for r in regexes]
    return 'start: TEXT\nTEXT: /(?s:.*)/ & ~/(?s:.*)(' + "|".join(alternatives) + ')(?s:.*)/\n'


# ------------------------------------------------------------------------------------ processors
def identity(input_ids, scores):
    return scores


class LLGuidanceProcessor:
    """What a transformers LogitsProcessor built on llguidance does per step: each row's matcher
    consumes the token sampled last step, the matchers fill a token bitmask (in parallel with
    LLExecutor when B > 1), and the bitmask is applied to the logits. The matchers are deep copies
    of one pre-built matcher (grammar construction is measured separately)."""

    def __init__(self, template, executor, apply_fn):
        self.template = template
        self.executor = executor
        self.apply = apply_fn
        self.matchers = None
        self.parts = {"consume": [], "fill": [], "apply": []}

    def __call__(self, input_ids, scores):
        import llguidance.torch as llt

        rows = input_ids.shape[0]
        c0 = time.perf_counter_ns()
        if self.matchers is None:  # first call: the prompt; nothing generated yet
            self.matchers = [self.template.deep_copy() for _ in range(rows)]
            self.bitmask = llt.allocate_token_bitmask(rows, scores.shape[-1])
            self.pairs = [(m, i) for i, m in enumerate(self.matchers)]
        else:
            last = input_ids[:, -1].tolist()
            if rows == 1:
                ok = [self.matchers[0].consume_token(last[0])]
            else:
                ok = self.executor.consume_token_par(list(zip(self.matchers, last)))
            if not all(ok):
                bad = ok.index(False)
                raise RuntimeError(f"llguidance refused token {last[bad]} in row {bad}: "
                                   f"{self.matchers[bad].get_error()[:300]}")
        c1 = time.perf_counter_ns()
        if rows == 1:
            llt.fill_next_token_bitmask(self.matchers[0], self.bitmask, 0)
        else:
            llt.fill_next_token_bitmask_par(self.executor, self.pairs, self.bitmask)
        c2 = time.perf_counter_ns()
        self.apply(scores, self.bitmask)
        c3 = time.perf_counter_ns()
        for m in self.matchers:
            if m.is_error():
                raise RuntimeError(f"llguidance matcher error: {m.get_error()[:300]}")
        self.parts["consume"].append(c1 - c0)
        self.parts["fill"].append(c2 - c1)
        self.parts["apply"].append(c3 - c2)
        return scores


def eager_apply_bitmask(scores, bitmask):
    """Fallback if llguidance's torch.compile'd kernel is unavailable: the same arithmetic, eager."""
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    allowed = bits.reshape(bitmask.shape[0], -1)[:, : scores.shape[-1]]
    scores.masked_fill_(allowed == 0, float("-inf"))


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


# ------------------------------------------------------------------------------------ the loop
def run_stream(proc, *, batch, prompt, script, bases, warmup, steps, cap_s, desc):
    """Simulated decoding; returns timings (ns per step), copies (ns) and what happened."""
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


# ------------------------------------------------------------------------------------ main phases
def safedecode_compile(policy, tok, tmp_root: Path) -> tuple[object, dict]:
    """Cold compile (no caches), then a disk-cache round trip; returns (compiled, numbers)."""
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
        key = sd_compiled.cache_key(policy, sd_compiled.vocabulary_of(tok), sd_compiled.DEFAULT_MAX_STATES)
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


LLG_LIMITS = [
    ("default", None),
    ("raised: initial_lexer_fuel=1e8, step_lexer_fuel=2e7",
     dict(initial_lexer_fuel=100_000_000, step_lexer_fuel=20_000_000)),
    ("large: initial_lexer_fuel=1e9, step_lexer_fuel=1e9, max_lexer_states=1e7",
     dict(initial_lexer_fuel=1_000_000_000, step_lexer_fuel=1_000_000_000, max_lexer_states=10_000_000)),
]


def llguidance_setup(ll, lltok, grammar: str, cap_s: float, rungs: int) -> tuple[object, dict]:
    """Build the matcher with llguidance's default parser limits; if that fails (at creation or on
    the first mask), retry with raised limits (the first ``rungs`` entries of LLG_LIMITS).
    Returns (template matcher or None, numbers)."""
    import llguidance.torch as llt

    attempts = []
    for name, kwargs in LLG_LIMITS[:rungs]:
        limits = ll.LLParserLimits(**kwargs) if kwargs else None

        def build():
            return ll.LLMatcher(lltok, grammar, log_level=0, limits=limits)

        matcher, err, seconds = run_with_cap(build, cap_s)
        attempt = {"limits": name, "create_s": seconds}
        if err is None and matcher.is_error():
            err = matcher.get_error().splitlines()[0][:300]
        if err is None:
            probe = matcher.deep_copy()
            bitmask = llt.allocate_token_bitmask(1, lltok.vocab_size)

            def first_mask():
                llt.fill_next_token_bitmask(probe, bitmask, 0)

            _, err2, seconds2 = run_with_cap(first_mask, cap_s)
            attempt["first_mask_s"] = seconds2
            if err2 is None and probe.is_error():
                err2 = probe.get_error().splitlines()[0][:300]
            err = err2
        attempt["error"] = err
        attempts.append(attempt)
        if err is None:
            return matcher, {"attempts": attempts, "limits": name, "create_s": seconds,
                             "first_mask_s": attempt.get("first_mask_s")}
        if err.startswith("timeout"):
            break
    tried = ", ".join(a["limits"].split(":")[0] for a in attempts)
    return None, {"attempts": attempts, "limits": None,
                  "error": f"{attempts[-1]['error']} (limits tried: {tried})"}


def masks_spelling(make, seq: list[int], prompt: list[int], V: int) -> bool:
    """Fed ``seq`` token by token after ``prompt``, does a fresh processor from ``make()`` mask one of
    its tokens? (Zero logits, B=1; stops at the first masked token.)"""
    proc = make()
    base = torch.zeros((1, V))
    for j in range(len(seq)):
        out = proc(torch.tensor([prompt + seq[:j]], dtype=torch.long), base.clone())
        if not torch.isfinite(out[0, seq[j]]):
            return True
    return False


def leak_check(tok, vocab, phrases, factories: dict, prompt) -> dict:
    """For each phrase, four spellings of ' ' + phrase (or phrase at the start); a spelling is
    *blocked* by a processor (``factories``: name → factory of fresh processors) if at some step
    along it the processor masks its next token."""
    single = {}

    def char_ids(text):
        out = []
        for ch in text:
            if ch not in single:
                enc = tok.encode(ch, add_special_tokens=False)
                single[ch] = enc if len(enc) == 1 else None
            if single[ch] is None:
                return None
            out += single[ch]
        return out

    def spellings(p):
        canon_space = tok.encode(" " + p, add_special_tokens=False)
        canon = tok.encode(p, add_special_tokens=False)
        chars = char_ids(" " + p)
        k = max(1, len(p) // 2)
        split = tok.encode(" " + p[:k], add_special_tokens=False) + tok.encode(p[k:], add_special_tokens=False)
        return {"canonical ' '+phrase (in bad_words_ids)": canon_space,
                "canonical phrase at start (in bad_words_ids)": canon,
                "one token per character": chars,
                "split mid-phrase (two encodes)": split}

    totals: dict = {}
    example = None
    for i, p in enumerate(phrases):
        for name, seq in spellings(p).items():
            row = totals.setdefault(name, {"n": 0, **{k: 0 for k in factories}, "skipped": 0})
            if not seq:
                row["skipped"] += 1
                continue
            row["n"] += 1
            verdicts = {k: masks_spelling(make, seq, prompt, len(tok)) for k, make in factories.items()}
            for k, v in verdicts.items():
                row[k] += int(v)
            if i == 0:
                example = example or {"phrase": p, "spellings": {}}
                example["spellings"][name] = {"ids": seq, "pieces": [vocab.token_bytes[t].decode("utf-8", "replace")
                                                                     if vocab.token_bytes[t] else None for t in seq],
                                              "blocked": verdicts}
    return {"phrases": len(phrases), "by_spelling": totals, "example": example}


# ------------------------------------------------------------------- adversarial leak / over-block
class PolicyOracle:
    """Does a text violate the policy? The verdict of ``safedecode.find_violations`` (the ``regex``
    package) on DESIGN §1's text of the bytes (``tests.oracle.text_of``: UTF-8, U+FFFD for invalid
    bytes, an incomplete sequence at the very end not yet a character), computed faster: plain
    case-sensitive literal rules by substring search (what ``regex.search`` of an escaped literal
    without flags is), every other rule by its own compiled ``regex`` search. Literal and regex rules
    only (the benchmark's policies); block rules are refused."""

    def __init__(self, policy):
        self.literals, self.patterns = [], []
        for rule in policy.forbid:
            if not isinstance(rule, (safedecode.policy.rules.LiteralRule, safedecode.policy.rules.RegexRule)):
                raise TypeError(f"PolicyOracle handles literal and regex rules only, not {type(rule).__name__}")
            if isinstance(rule, safedecode.policy.rules.LiteralRule) and not rule.whole_word and not rule.ignore_case:
                self.literals.append(rule.literal)
            else:
                self.patterns.append(regex.compile(rule.pattern, rule.flags))

    def violates(self, data: bytes) -> bool:
        text = text_of(data)
        return any(p in text for p in self.literals) or any(rx.search(text) for rx in self.patterns)


def adds_replacement_char(data: bytes, token: bytes) -> bool:
    """Does appending ``token`` add a U+FFFD (invalid UTF-8) to the text? (text_of(data) is a prefix
    of text_of(data + token).)"""
    return "\ufffd" in text_of(data + token)[len(text_of(data)):]


def adversary_targets(phrases: list[str], regexes: list[str], oracle: PolicyOracle, seed: int) -> dict:
    """What the adversary pushes toward: ' ' + each phrase, and (with regexes) 200 secret-like
    strings that the policy forbids (``secret_like``, kept only if they violate)."""
    rng = np.random.default_rng(seed + 2)
    secrets = []
    for _ in range(200 if regexes else 0):
        s = secret_like(rng)
        if oracle.violates(s.encode()):
            secrets.append(s.encode())
    return {"phrases": [(" " + p).encode() for p in phrases], "secrets": secrets}


def adversarial_scores(np_rng, rng, V: int, non_text, wanted: list[int]):
    """Random normal logits (1, V), non-text ids at -inf, +100 (+ rank) on the adversary's
    candidates in a random order: one random tokenization of the forbidden continuation wins."""
    scores = torch.from_numpy(np_rng.normal(size=(1, V)).astype(np.float32))
    scores[0, non_text] = float("-inf")
    for rank, token in enumerate(rng.sample(wanted, len(wanted))):
        scores[0, token] += 100.0 + rank
    return scores


def judge_step(st: dict, oracle, vocab, data: bytes, wanted: list[int], masked: list[int], text_ids, sample, rng):
    """One step's verdicts, counted into ``st``: over-blocked tokens among the masked ones (all, or a
    random ``sample``), leaked tokens among the adversary's candidates + ``sample``/2 random allowed
    text tokens. Returns (over-blocked, leaked)."""
    masked_set, wanted_set = set(masked), set(wanted)
    checked = masked if len(masked) <= sample else rng.sample(masked, sample)
    over = [t for t in checked if not oracle.violates(data + vocab.token_bytes[t])]
    allowed = (wanted_set | set(rng.sample(text_ids, sample // 2))) - masked_set
    leaks = [t for t in sorted(allowed) if oracle.violates(data + vocab.token_bytes[t])]
    counts = {"steps": 1, "masked_total": len(masked), "wanted_total": len(wanted_set),
              "wanted_masked": len(wanted_set & masked_set), "masked_checked": len(checked),
              "overblocked": len(over), "overblock_steps": int(bool(over)),
              "overblocked_invalid_utf8": sum(adds_replacement_char(data, vocab.token_bytes[t]) for t in over),
              "allowed_checked": len(allowed), "leaked": len(leaks), "leak_steps": int(bool(leaks))}
    for key, n in counts.items():
        st[key] = st.get(key, 0) + n
    return over, leaks


def adversarial_run(make, vocab, adversary, oracle: PolicyOracle, targets: dict, *, prompt, steps, sample,
                    seed, policy) -> dict:
    """Drive fresh processors from ``make()`` with the test-suite's adversary (B=1) and count leaks
    and over-blocks at every step (``adversarial_scores``, then ``judge_step`` against ``oracle``).
    The argmax is appended; if it completed a forbidden text (a leak taken) or the text passes 70
    bytes, a new generation starts; the target changes then and every 12 steps."""
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    text_ids = [i for i, b in enumerate(vocab.token_bytes) if b]
    non_text = torch.tensor([i for i, b in enumerate(vocab.token_bytes) if not b], dtype=torch.long)
    pools = [pool for pool in (targets["phrases"], targets["secrets"]) if pool]
    st = {"generations": 0, "completed": 0, "oracle_disagreements": 0, "examples": {}}

    def example(kind, data, token):
        st["examples"].setdefault(kind, {"text": text_of(data)[-60:],
                                         "token": vocab.token_bytes[token].decode("utf-8", "backslashreplace"),
                                         "token_id": token})

    proc, data, generated, target = None, b"", [], b""
    for step in range(steps):
        if proc is None or step % 12 == 0:
            target = rng.choice(rng.choice(pools))
        if proc is None:
            proc, data, generated = make(), b"", []
            st["generations"] += 1
        wanted = adversary.candidates(data, target)
        scores = adversarial_scores(np_rng, rng, vocab.size, non_text, wanted)
        before = torch.isneginf(scores[0])
        out = proc(torch.tensor([prompt + generated], dtype=torch.long), scores)
        masked = np.flatnonzero((torch.isneginf(out[0]) & ~before).numpy()).tolist()
        over, leaks = judge_step(st, oracle, vocab, data, wanted, masked, text_ids, sample, rng)
        if over:
            example("over-block", data, over[0])
        if leaks:
            example("leak", data, leaks[0])
        choice = int(torch.argmax(out[0]))
        bad = oracle.violates(data + (vocab.token_bytes[choice] or b""))
        if bad:
            st["completed"] += 1
            example("completed", data, choice)
        generated.append(choice)
        data += vocab.token_bytes[choice] or b""
        st["oracle_disagreements"] += bad != bool(safedecode.find_violations(policy, text_of(data)))
        if bad or len(data) > 70:
            proc = None
    n = max(1, st.get("steps", 0))
    st.update(leak_step_rate=st.get("leak_steps", 0) / n, overblock_step_rate=st.get("overblock_steps", 0) / n,
              leak_token_rate=st.get("leaked", 0) / max(1, st.get("allowed_checked", 0)),
              overblock_token_rate=st.get("overblocked", 0) / max(1, st.get("masked_checked", 0)))
    return st


def adversarial_check(vocab, policy, phrases, regexes, factories: dict, *, prompt, steps, sample, seed) -> dict:
    """``adversarial_run`` for each processor (name → factory), same seed and targets for all."""
    try:
        # The test-suite's driver, so the benchmark pushes exactly as the tests do (it imports pytest).
        from tests.test_adversarial import Adversary
    except ImportError as exc:
        return {"error": f"the adversary of tests/test_adversarial.py is not importable: {exc}"}
    oracle = PolicyOracle(policy)
    targets = adversary_targets(phrases, regexes, oracle, seed)
    adversary = Adversary(vocab, random.Random(seed))
    out = {"steps": steps, "sample": sample, "targets": {k: len(v) for k, v in targets.items()},
           "target_examples": [t.decode() for t in targets["phrases"][:3] + targets["secrets"][:5]],
           "by_processor": {}}
    for name, make in factories.items():
        t0 = time.perf_counter()
        try:
            r = adversarial_run(make, vocab, adversary, oracle, targets, prompt=prompt, steps=steps,
                                sample=sample, seed=seed, policy=policy)
        except Exception as exc:  # noqa: BLE001 - recorded, the other processors still run
            r = {"error": f"{type(exc).__name__}: {exc}"}
        r["wall_s"] = time.perf_counter() - t0
        out["by_processor"][name] = r
        log(f"    adversarial {name:<11} " + (r["error"][:160] if "error" in r else
            f"leak steps {r['leak_steps']}/{r['steps']}, leaked tokens {r['leaked']}/{r['allowed_checked']}, "
            f"over-block steps {r['overblock_steps']}/{r['steps']}, over-blocked {r['overblocked']}/"
            f"{r['masked_checked']} checked, completed {r['completed']}/{r['generations']} ({r['wall_s']:.0f} s)"))
    return out


def peer_factories(nbw, template, executor, apply_fn, xgr_make, compiled) -> dict:
    """name → factory of a fresh B=1 processor, for every peer built for this policy (llguidance and
    xgrammar only where they could be built)."""
    factories = {"none": lambda: identity, "nobadwords": lambda: nbw}
    if template is not None:
        factories["llguidance"] = lambda: LLGuidanceProcessor(template, executor, apply_fn)
    if xgr_make is not None:
        factories["xgrammar"] = xgr_make
    factories["safedecode"] = lambda: safedecode.SafeLogitsProcessor(compiled)
    return factories


def run_leak_check(results, tok, vocab, phrases, factories: dict, prompt) -> None:
    """``leak_check`` for every peer but 'none' into ``results["leak"]`` (an error is recorded)."""
    log(f"  leak check ({len(phrases)}-phrase policy) ...")
    try:
        results["leak"] = leak_check(tok, vocab, phrases, {k: f for k, f in factories.items() if k != "none"}, prompt)
        for name, row in results["leak"]["by_spelling"].items():
            counts = ", ".join(f"{k} {row[k]}/{row['n']}" for k in row if k not in ("n", "skipped"))
            log(f"    {name}: blocked {counts}")
    except Exception as exc:  # noqa: BLE001
        results["leak"] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        log(f"    leak check failed: {exc}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced CI-sized run (fewer steps)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="output directory")
    ap.add_argument("--steps", type=int, help="timed steps per configuration (default 500, quick 100)")
    ap.add_argument("--warmup", type=int, help="untimed warm-up steps (default 50, quick 15)")
    ap.add_argument("--sizes", default="10,100,1000", help="phrase counts (default 10,100,1000)")
    ap.add_argument("--no-regex-policies", action="store_true", help="skip the '+R' policies (phrases + 10 regexes)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--processors", default=",".join(PROCESSORS))
    ap.add_argument("--cap", type=float, help="seconds per configuration (and per llguidance grammar build) before it is cut short (default 90, quick 30)")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch intra-op threads (default 1: stable timings on a shared machine)")
    ap.add_argument("--adversarial-policies", default="100,10+R",
                    help="policies on which every peer is driven by the adversary to count leaks and over-blocks "
                         "(default 100,10+R; '' skips)")
    ap.add_argument("--adversarial-steps", type=int, help="adversary steps per processor and policy (default 300, quick 40)")
    ap.add_argument("--adversarial-sample", type=int,
                    help="masked ids checked per step at most, and twice the random allowed ids checked "
                         "(default 2000, quick 400)")
    ap.add_argument("--no-xgrammar", action="store_true", help="leave xgrammar out of the leak and adversarial checks")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)

    steps = args.steps or (100 if args.quick else 500)
    warmup = args.warmup if args.warmup is not None else (15 if args.quick else 50)
    cap_s = args.cap or (30.0 if args.quick else 90.0)
    adversarial = [p for p in args.adversarial_policies.split(",") if p]
    adv_steps = args.adversarial_steps or (40 if args.quick else 300)
    adv_sample = args.adversarial_sample or (400 if args.quick else 2000)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    batches = [int(b) for b in args.batches.split(",") if b]
    wanted = [p for p in args.processors.split(",") if p]
    unknown = set(wanted) - set(PROCESSORS)
    if unknown:
        ap.error(f"unknown processors {sorted(unknown)}; choose from {PROCESSORS}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(args.seed)
    t_run = time.perf_counter()

    results: dict = {"config": {"quick": args.quick, "steps": steps, "warmup": warmup, "cap_s": cap_s,
                                "sizes": sizes, "batches": batches, "processors": wanted, "seed": args.seed,
                                "regexes": REGEXES, "targets": TARGETS, "adversarial_policies": adversarial,
                                "adversarial_steps": adv_steps, "adversarial_sample": adv_sample},
                     "machine": machine_info(args.torch_threads)}

    def save():
        (out_dir / "overhead.json").write_text(json.dumps(results, indent=1, default=str))

    # ---------------------------------------------------------------- tokenizer, workload
    log("loading the SmolLM2-135M tokenizer ...")
    from safedecode.models import load_default_tokenizer

    t0 = time.perf_counter()
    tok = load_default_tokenizer()
    results["tokenizer"] = {"name": "SmolLM2-135M-Instruct", "vocab_size": len(tok), "load_s": time.perf_counter() - t0,
                            "eos_token_id": tok.eos_token_id}
    V = len(tok)
    words = vocabulary_words(tok)
    phrases = make_phrases(words, max(sizes), args.seed)
    script = make_script(tok, words, phrases, 4000, args.seed)
    prompt = prompt_ids(tok)
    policies = []  # (name, n_phrases, regexes)
    for n in sizes:
        policies.append((str(n), n, []))
    if not args.no_regex_policies:
        for n in sizes:
            policies.append((f"{n}+R", n, REGEXES))
    missing = sorted(set(adversarial) - {name for name, _, _ in policies})
    if missing:
        log(f"adversarial policies not in this run, skipped: {missing}")
    results["workload"] = {"words_in_pool": len(words), "phrases": phrases, "prompt_tokens": len(prompt),
                           "script_tokens": len(script), "policies": [p[0] for p in policies]}
    log(f"{len(words)} candidate words; {len(phrases)} phrases, e.g. {phrases[:4]}; script of {len(script)} tokens")

    # Random logits (a few rotating sets), EOS suppressed so that every stream runs its full length.
    gen = torch.Generator().manual_seed(args.seed)
    bases = torch.randn((4, max(batches), V), generator=gen) * 4.0
    if tok.eos_token_id is not None:
        bases[:, :, tok.eos_token_id] = float("-inf")

    # ---------------------------------------------------------------- warm-ups
    t0 = time.perf_counter()
    try:
        from safedecode.tokens.vocabulary import vocabulary_of

        vocab = vocabulary_of(tok)
    except Exception:  # noqa: BLE001
        vocab = sd_compiled.vocabulary_of(tok)
    results["safedecode_first_use"] = {"vocabulary_extraction_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    tiny = safedecode.compile_policy(safedecode.Policy(forbid=[{"literal": "zebra crossing"}]), tok, cache_dir=False)
    results["safedecode_first_use"]["first_tiny_compile_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for rows in batches:  # numba kernels: load/compile every signature the runs will use
        warm = safedecode.SafeLogitsProcessor(tiny)
        ids = torch.tensor([prompt] * rows)
        for _ in range(3):
            warm(ids, torch.zeros((rows, V)))
            ids = torch.cat([ids, ids[:, -1:]], dim=1)
    results["safedecode_first_use"]["kernel_warmup_s"] = time.perf_counter() - t0
    clear_memory_cache()
    log(f"safedecode first use: {results['safedecode_first_use']}")

    ll = executor = apply_fn = None
    if "llguidance" in wanted:
        try:
            import llguidance as ll
            import llguidance.hf
            import llguidance.torch as llt

            t0 = time.perf_counter()
            lltok = llguidance.hf.from_tokenizer(tok)
            setup = {"version": ll.__version__, "tokenizer_s": time.perf_counter() - t0,
                     "vocab_size": lltok.vocab_size}
            executor = ll.LLExecutor()
            apply_fn, apply_name = llt.apply_token_bitmask_inplace, "llguidance.torch.apply_token_bitmask_inplace (torch.compile)"
            t0 = time.perf_counter()
            try:
                for rows in batches:
                    for _ in range(2):
                        apply_fn(torch.zeros((rows, V)), llt.allocate_token_bitmask(rows, V))
            except Exception as exc:  # noqa: BLE001 - no compiler: same arithmetic, eager
                setup["apply_compile_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                apply_fn, apply_name = eager_apply_bitmask, "eager torch (fallback)"
            setup["apply_warmup_s"] = time.perf_counter() - t0
            setup["apply"] = apply_name
            results["llguidance_setup"] = setup
            log(f"llguidance {ll.__version__}: tokenizer {setup['tokenizer_s']:.2f} s, "
                f"apply kernel warm-up {setup['apply_warmup_s']:.1f} s ({apply_name})")
        except Exception as exc:  # noqa: BLE001
            results["llguidance_setup"] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"llguidance unavailable: {exc}")
            ll = None
    save()

    # ---------------------------------------------------------------- runs
    tmp_root = Path(tempfile.mkdtemp(prefix="safedecode-bench-"))
    results["compile"] = {}
    results["runs"] = []
    results["leak"] = None
    results["adversarial"] = {}
    xgrammar_makers: dict = {}  # phrase count → (factory or None, numbers)

    def record(processor, policy_name, rows, run, extra=None):
        entry = {"processor": processor, "policy": policy_name, "batch": rows,
                 "summary": summary(run["calls_ns"]), "copy_summary": summary(run["copies_ns"]),
                 "blocked_tokens": run["blocked_tokens"], "error": run["error"], "capped": run["capped"],
                 "wall_s": run["wall_s"], "calls_us": [round(x / 1e3, 3) for x in run["calls_ns"]],
                 "copies_us": [round(x / 1e3, 3) for x in run["copies_ns"]]}
        entry.update(extra or {})
        results["runs"].append(entry)
        s = entry["summary"]
        status = f" ERROR: {run['error'][:120]}" if run["error"] else (" (capped)" if run["capped"] else "")
        log(f"  {processor:<12} {policy_name:<7} B={rows:<3} p50={fmt_us(s.get('p50_us'))} µs "
            f"p99={fmt_us(s.get('p99_us'))} µs n={s['n']} blocked={run['blocked_tokens']}{status}")
        save()

    def stream(proc, rows, desc):
        return run_stream(proc, batch=rows, prompt=prompt, script=script, bases=bases, warmup=warmup,
                          steps=steps, cap_s=cap_s, desc=desc)

    # Policy-independent peers, once per batch size.
    for name, make in (("none", lambda: identity),
                       ("temperature", lambda: __import__("transformers").TemperatureLogitsWarper(0.7))):
        if name in wanted:
            for rows in batches:
                record(name, "—", rows, stream(make(), rows, f"{name} B={rows}"))

    def violations(policy, generated):
        rows_bad, total = 0, 0
        for row in generated:
            found = safedecode.find_violations(policy, vocab.text(row))
            rows_bad += bool(found)
            total += len(found)
        return {"rows_with_violation": rows_bad, "violations": total}

    for policy_name, n, regexes in policies:
        log(f"policy {policy_name}: {n} phrases + {len(regexes)} regexes")
        policy = safedecode.Policy(forbid=[{"literal": p} for p in phrases[:n]] + [{"regex": r} for r in regexes])
        entry = results["compile"].setdefault(policy_name, {"phrases": n, "regexes": len(regexes)})

        compiled = None
        if "safedecode" in wanted or n == 100 or policy_name in adversarial:
            try:
                compiled, info = safedecode_compile(policy, tok, tmp_root)
                entry["safedecode"] = info
                s = info["stats"]
                log(f"  safedecode compile {info['cold_compile_s']:.2f} s, cached load "
                    f"{min(info['cached_load_s']) * 1e3:.1f} ms (hit={info['cached_load_hit']}), "
                    f"{s.get('table_bytes', 0) / 1e6:.1f} MB, {s.get('token_states')} token states, "
                    f"{s.get('components', 1)} component(s)")
            except Exception as exc:  # noqa: BLE001
                entry["safedecode"] = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"  safedecode compile FAILED: {exc}")
        save()

        template = None
        if ll is not None:
            grammar = lark_grammar(phrases[:n], regexes)
            template, info = llguidance_setup(ll, lltok, grammar, cap_s, 2 if args.quick else len(LLG_LIMITS))
            info["grammar_chars"] = len(grammar)
            entry["llguidance"] = info
            if template is None:
                log(f"  llguidance matcher FAILED: {info.get('error')}")
            else:
                log(f"  llguidance matcher {info['create_s'] * 1e3:.0f} ms, first mask "
                    f"{(info['first_mask_s'] or 0) * 1e3:.0f} ms (limits: {info['limits']})")
        bad_words = []
        for p in phrases[:n]:
            for seq in (tok.encode(p, add_special_tokens=False), tok.encode(" " + p, add_special_tokens=False)):
                if seq and seq not in bad_words:
                    bad_words.append(seq)
        entry["nobadwords_sequences"] = len(bad_words)
        save()

        from transformers import NoBadWordsLogitsProcessor

        for rows in batches:
            if "nobadwords" in wanted and not regexes:  # regexes are not expressible: '+R' rows would repeat these
                nbw = NoBadWordsLogitsProcessor(bad_words, eos_token_id=tok.eos_token_id)
                run = stream(nbw, rows, f"nobadwords {policy_name} B={rows}")
                record("nobadwords", policy_name, rows, run, {"violations": violations(policy, run["generated"])})
            if "llguidance" in wanted:
                if template is None:
                    results["runs"].append({"processor": "llguidance", "policy": policy_name, "batch": rows,
                                            "summary": {"n": 0}, "setup_failed": True,
                                            "error": entry.get("llguidance", {}).get("error", "unavailable")})
                else:
                    proc = LLGuidanceProcessor(template, executor, apply_fn)
                    run = stream(proc, rows, f"llguidance {policy_name} B={rows}")
                    parts = {k: summary(v[warmup:]) for k, v in proc.parts.items()}
                    record("llguidance", policy_name, rows, run,
                           {"parts": parts, "violations": violations(policy, run["generated"])})
            if "safedecode" in wanted:
                if compiled is None:
                    results["runs"].append({"processor": "safedecode", "policy": policy_name, "batch": rows,
                                            "summary": {"n": 0}, "setup_failed": True,
                                            "error": entry.get("safedecode", {}).get("error") or "compile failed"})
                else:
                    proc = safedecode.SafeLogitsProcessor(compiled)
                    run = stream(proc, rows, f"safedecode {policy_name} B={rows}")
                    record("safedecode", policy_name, rows, run, {"violations": violations(policy, run["generated"])})

        leak_due = n == 100 and not regexes and results["leak"] is None
        if compiled is not None and (leak_due or policy_name in adversarial):
            if not args.no_xgrammar and n not in xgrammar_makers:
                log(f"  xgrammar: compiling `excludes` for {n} phrases ...")
                xgrammar_makers[n] = xgrammar_build(tok, phrases[:n], cap_s)
                x = xgrammar_makers[n][1]
                compiled_in = f"compiled in {x['compile_s']:.2f} s" if x.get("compile_s") is not None else ""
                log(f"  xgrammar: {x.get('skipped') or x.get('error') or compiled_in}")
            xgr_make, xgr_info = xgrammar_makers.get(n, (None, {"skipped": "--no-xgrammar"}))
            entry["xgrammar"] = xgr_info
            factories = peer_factories(NoBadWordsLogitsProcessor(bad_words, eos_token_id=tok.eos_token_id),
                                       template, executor, apply_fn, xgr_make, compiled)
            if leak_due:
                run_leak_check(results, tok, vocab, phrases[:n], factories, prompt)
            if policy_name in adversarial:
                log(f"  adversarial driver ({policy_name}: {adv_steps} steps per processor) ...")
                results["adversarial"][policy_name] = adversarial_check(
                    vocab, policy, phrases[:n], regexes, factories, prompt=prompt, steps=adv_steps,
                    sample=adv_sample, seed=args.seed)
        del compiled, template
        clear_memory_cache()
        gc.collect()
        save()

    shutil.rmtree(tmp_root, ignore_errors=True)
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    results["total_wall_s"] = time.perf_counter() - t_run
    results["targets_met"] = evaluate_targets(results)
    save()
    (out_dir / "overhead.md").write_text(render_markdown(results))
    try:
        plot(results, out_dir / "overhead.png")
    except Exception as exc:  # noqa: BLE001
        log(f"plot failed: {exc}")
    log(f"done in {results['total_wall_s']:.0f} s: {out_dir / 'overhead.md'}, overhead.json, overhead.png")
    return 0


# ------------------------------------------------------------------------------------ reporting
def find_run(results, processor, policy, batch):
    for r in results["runs"]:
        if r["processor"] == processor and r["policy"] == policy and r["batch"] == batch:
            return r
    return None


def p50(results, processor, policy, batch):
    r = find_run(results, processor, policy, batch)
    return None if r is None or r.get("error") or not r["summary"].get("n") else r["summary"]["p50_us"]


def evaluate_targets(results) -> list[dict]:
    """Each target, for the 1,000-phrase policies (with and without the regexes), from measured numbers."""
    out = []
    for policy in ("1000", "1000+R"):
        r = find_run(results, "safedecode", policy, 1)
        if r is None:
            continue
        s = r["summary"]
        ok_run = not r.get("error") and s.get("n")
        out.append({"target": f"safedecode p50 ≤ {TARGETS['p50_us']:g} µs/step at B=1", "policy": policy,
                    "value": s.get("p50_us"), "unit": "µs", "met": bool(ok_run and s["p50_us"] <= TARGETS["p50_us"])})
        out.append({"target": f"safedecode p99 ≤ {TARGETS['p99_us']:g} µs/step at B=1", "policy": policy,
                    "value": s.get("p99_us"), "unit": "µs", "met": bool(ok_run and s["p99_us"] <= TARGETS["p99_us"])})
        ll, sd = p50(results, "llguidance", policy, 1), p50(results, "safedecode", policy, 1)
        ratio = ll / sd if ll and sd else None
        why = None
        if ratio is None:
            lr = find_run(results, "llguidance", policy, 1)
            why = (f"llguidance: {lr['error'].split(';')[0][:160]}" if lr and lr.get("error")
                   else "llguidance not run")
        out.append({"target": f"≥ {TARGETS['speedup_vs_llguidance']:g}× faster than llguidance (p50, B=1)",
                    "policy": policy, "value": ratio, "unit": "×", "why_not_measured": why,
                    "met": None if ratio is None else bool(ratio >= TARGETS["speedup_vs_llguidance"])})
        c = results["compile"].get(policy, {}).get("safedecode", {})
        cold = c.get("cold_compile_s")
        out.append({"target": f"compile ≤ {TARGETS['compile_s']:g} s (cold)", "policy": policy, "value": cold,
                    "unit": "s", "met": bool(cold is not None and cold <= TARGETS["compile_s"])})
        loads = c.get("cached_load_s")
        load_ms = min(loads) * 1e3 if loads and c.get("cached_load_hit") else None
        out.append({"target": f"cached load ≤ {TARGETS['cached_load_ms']:g} ms", "policy": policy, "value": load_ms,
                    "unit": "ms", "met": bool(load_ms is not None and load_ms <= TARGETS["cached_load_ms"])})
    return out


_SHOWN_STATS = {"components", "dfa_states", "token_states", "table_bytes", "rules", "vocab_size"}


def num(x) -> str:
    return f"{x:,}" if isinstance(x, int) else ("—" if x is None else str(x))


def render_markdown(results) -> str:
    cfg, m = results["config"], results["machine"]
    batches = cfg["batches"]
    policies = results["workload"]["policies"]
    lines = ["# safedecode: per-step overhead vs peers", ""]
    lines.append(f"{'Quick (CI-sized)' if cfg['quick'] else 'Full'} run, {m['date']}; "
                 f"{cfg['steps']} timed steps per configuration after {cfg['warmup']} warm-up steps; "
                 f"SmolLM2-135M-Instruct vocabulary ({results['tokenizer']['vocab_size']:,} tokens), float32 CPU logits. "
                 f"Times are wall-clock µs per processor call (`time.perf_counter_ns`), GC disabled during the loop. "
                 f"Policies: *N* phrases; *N*+R = the same phrases plus 10 secret-like regexes.")
    lines.append("")
    lines.append("## Per-step time (µs)")
    lines.append("")
    head = "| processor | policy | " + " | ".join(f"B={b} p50 | B={b} p99" for b in batches) + " | blocked tokens | violations in output | notes |"
    lines.append(head)
    lines.append("|" + "---|" * (head.count("|") - 1))

    def row_for(processor, policy, note=""):
        cells, blocked, viol, notes = [], [], [], [note] if note else []
        for b in batches:
            r = find_run(results, processor, policy, b)
            if r is None:
                cells += ["—", "—"]
                continue
            s = r["summary"]
            cells += [fmt_us(s.get("p50_us")), fmt_us(s.get("p99_us"))]
            if r.get("setup_failed"):
                note = f"could not be built: {r['error'][:200]}"
                if note not in notes:
                    notes.append(note)
            elif r.get("error"):
                notes.append(f"B={b}: error after {s.get('n', 0)} timed steps: {r['error'][:160]}")
            elif r.get("capped"):
                notes.append(f"B={b}: stopped at the {cfg['cap_s']:.0f} s cap after {s.get('n', 0)} timed steps")
            if "blocked_tokens" in r:
                blocked.append(str(r["blocked_tokens"]))
            if r.get("violations"):
                viol.append(f"{r['violations']['rows_with_violation']}/{b}")
        lines.append(f"| {LABELS[processor]} | {policy} | " + " | ".join(cells) +
                     f" | {' / '.join(blocked) or '—'} | {' / '.join(viol) or '—'} | {'; '.join(notes)} |")

    if any(r["processor"] == "none" for r in results["runs"]):
        row_for("none", "—", "baseline: the timer and a Python call")
        cells = []
        for b in batches:
            r = find_run(results, "none", "—", b)
            s = r["copy_summary"] if r else {}
            cells += [fmt_us(s.get("p50_us")), fmt_us(s.get("p99_us"))]
        lines.append("| *reference: copying the logits* | — | " + " | ".join(cells) +
                     " | — | — | `scores.copy_(fresh)`, not part of any row above |")
    if any(r["processor"] == "temperature" for r in results["runs"]):
        row_for("temperature", "—", "the cost of a trivial processor")
    for proc in ("nobadwords", "llguidance", "safedecode"):
        for pol in policies:
            if proc == "nobadwords" and pol.endswith("+R"):
                if any(r["processor"] == "nobadwords" for r in results["runs"]):
                    lines.append(f"| {LABELS[proc]} | {pol} | " + " | ".join("n/a" for _ in range(2 * len(batches))) +
                                 f" | — | — | regexes cannot be expressed as bad_words_ids (see row {pol[:-2]}) |")
                continue
            if any(r["processor"] == proc and r["policy"] == pol for r in results["runs"]):
                note = ""
                if proc == "llguidance":
                    lim = results["compile"].get(pol, {}).get("llguidance", {}).get("limits")
                    if lim and lim != "default":
                        note = f"default parser limits fail; run with {lim}"
                row_for(proc, pol, note)
    lines.append("")
    lines.append("*blocked tokens*: steps × rows where the scripted next token was masked (B=1 / B=32). "
                 "*violations in output*: rows whose generated text matches the policy, checked by "
                 "`safedecode.find_violations` (the `regex` package) on the whole generated text.")
    lines.append("")

    # speed-up table
    if any(r["processor"] == "llguidance" for r in results["runs"]) and any(r["processor"] == "safedecode" for r in results["runs"]):
        lines.append("## llguidance ÷ safedecode (p50)")
        lines.append("")
        lines.append("| policy | " + " | ".join(f"B={b}" for b in batches) + " |")
        lines.append("|---|" + "---|" * len(batches))
        for pol in policies:
            cells = []
            for b in batches:
                ll, sd = p50(results, "llguidance", pol, b), p50(results, "safedecode", pol, b)
                cells.append(f"{ll / sd:,.0f}×" if ll and sd else "—")
            lines.append(f"| {pol} | " + " | ".join(cells) + " |")
        parts_lines = []
        for r in results["runs"]:
            if r["processor"] == "llguidance" and r.get("parts") and r["summary"].get("n"):
                p = r["parts"]
                parts_lines.append(f"| {r['policy']} | {r['batch']} | {fmt_us(p['consume'].get('p50_us'))} | "
                                   f"{fmt_us(p['fill'].get('p50_us'))} | {fmt_us(p['apply'].get('p50_us'))} |")
        if parts_lines:
            lines += ["", "llguidance per-step breakdown (p50 µs):", "",
                      "| policy | B | consume token | fill bitmask | apply bitmask |", "|---|---|---|---|---|"] + parts_lines
        lines.append("")

    # compile table
    lines.append("## Compile, load and size")
    lines.append("")
    lines.append("| policy | safedecode cold compile (s) | cached load (ms) | table (MB) | components | DFA states | token states | other table stats | llguidance matcher (ms) | llguidance first mask (ms) | llguidance limits | NoBadWords sequences |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for pol in policies:
        c = results["compile"].get(pol, {})
        sd, ll = c.get("safedecode", {}), c.get("llguidance", {})
        s = sd.get("stats", {})
        if sd.get("error"):
            sd_cells = [f"error: {sd['error'][:80]}"] + ["—"] * 6
        elif sd:
            loads = sd.get("cached_load_s") or []
            load = f"{min(loads) * 1e3:.1f}" if loads and sd.get("cached_load_hit") else "miss"
            sd_cells = [f"{sd['cold_compile_s']:.2f}", load, f"{s.get('table_bytes', 0) / 1e6:.1f}",
                        num(s.get("components", 1)), num(s.get("dfa_states")), num(s.get("token_states")),
                        ", ".join(f"{k} {num(v)}" for k, v in s.items()
                                  if isinstance(v, int) and not isinstance(v, bool) and k not in _SHOWN_STATS) or "—"]
        else:
            sd_cells = ["—"] * 7
        if ll.get("create_s") is not None:
            ll_cells = [f"{ll['create_s'] * 1e3:.0f}", f"{(ll.get('first_mask_s') or 0) * 1e3:.0f}", ll.get("limits") or "—"]
        elif ll:
            ll_cells = ["failed", "—", f"{(ll.get('error') or '')[:100]}"]
        else:
            ll_cells = ["—"] * 3
        lines.append(f"| {pol} | " + " | ".join(sd_cells + ll_cells) + f" | {c.get('nobadwords_sequences', '—')} |")
    fu = results.get("safedecode_first_use", {})
    lines.append("")
    lines.append(f"Cold compile: in-process and disk caches off, vocabulary already extracted "
                 f"(first use per tokenizer: {fu.get('vocabulary_extraction_s', 0):.2f} s, not included). "
                 f"Cached load: in-process cache cleared, `.npz` read from a disk cache (best of 3, warm page cache). "
                 f"llguidance: `LLMatcher` construction for the grammar and the first mask computation "
                 f"(its lexer is built lazily; `llguidance.hf.from_tokenizer` took "
                 f"{results.get('llguidance_setup', {}).get('tokenizer_s', 0):.2f} s once).")
    lines.append("")

    # leak check
    leak = results.get("leak")
    if leak and not leak.get("error"):
        lines.append("## Leak check (100-phrase policy)")
        lines.append("")
        procs = [k for k in ("nobadwords", "llguidance", "xgrammar", "safedecode")
                 if any(k in row for row in leak["by_spelling"].values())]
        lines.append("| spelling of each phrase | phrases | " + " | ".join(f"blocked by {LABELS[k]}" for k in procs) + " |")
        lines.append("|---|---|" + "---|" * len(procs))
        for name, row in leak["by_spelling"].items():
            lines.append(f"| {name} | {row['n']} | " + " | ".join(f"{row[k]}/{row['n']}" for k in procs) + " |")
        ex = leak.get("example")
        if ex:
            lines.append("")
            lines.append(f"Example, phrase `{ex['phrase']}`:")
            lines.append("")
            for name, sp in ex["spellings"].items():
                verdict = ", ".join(f"{LABELS[k]}: {'blocked' if v else '**gets through**'}" for k, v in sp["blocked"].items())
                pieces = " · ".join(repr(p) for p in sp["pieces"])
                lines.append(f"- {name}: ids {sp['ids']} ({pieces}) → {verdict}")
        lines.append("")
        lines.append("A spelling is *blocked* if, feeding it token by token after the prompt, the processor masks one "
                     "of its tokens. NoBadWords only knows the token sequences in `bad_words_ids` "
                     "(`encode(p)` and `encode(' ' + p)`); the same text spelled with other tokens is not masked.")
        lines.append("")
    elif leak:
        lines += ["## Leak check", "", f"failed: {leak['error']}", ""]
    lines += render_adversarial(results)

    # targets
    lines.append("## Targets")
    lines.append("")
    met = results.get("targets_met", [])
    for t in met:
        v = t["value"]
        if v is None:
            shown = "not measured" + (f" ({t['why_not_measured']})" if t.get("why_not_measured") else "")
        else:
            shown = f"{v:,.1f} {t['unit']}" if t["unit"] != "×" else f"{v:,.0f}×"
        mark = "⚠️ not measurable" if t["met"] is None else ("✅ met" if t["met"] else "❌ not met")
        lines.append(f"- {mark}: {t['target']} — policy {t['policy']}: {shown}")
    measured = [t for t in met if t["met"] is not None]
    n_met = sum(bool(t["met"]) for t in measured)
    names = sorted({t["target"] for t in measured if t["met"]})
    lines.append("")
    lines.append(f"**Targets met by the measured numbers: {n_met} of {len(measured)} measurable checks"
                 + (f" ({'; '.join(names)})" if names else "") + ".**")
    lines.append("")

    # machine
    lines.append("## Machine")
    lines.append("")
    lines.append(f"- CPU: {m['cpu_model']}; {m['logical_cores']} logical cores ({m['usable_cores']} usable); "
                 f"torch intra-op threads: {m['torch_threads']}")
    lines.append(f"- load average at start / end: {', '.join(f'{x:.2f}' for x in m['loadavg_start'])} / "
                 f"{', '.join(f'{x:.2f}' for x in m.get('loadavg_end', []))} (a loaded machine inflates p99s)")
    lines.append(f"- {m['platform']}; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    lines.append(f"- git commit: {m.get('git_commit') or 'unknown'}; date: {m['date']}; total run time {results.get('total_wall_s', 0):.0f} s")
    ls = results.get("llguidance_setup", {})
    if ls.get("apply"):
        lines.append(f"- llguidance bitmask applied with {ls['apply']}; masks for B>1 filled by `LLExecutor` "
                     f"(llguidance's own thread pool)")
    lines.append("")
    return "\n".join(lines)


def pct_of(count, total) -> str:
    """'3 / 150 (2.0 %)'."""
    return f"{count:,} / {total:,} ({100 * count / total:.1f} %)" if total else "—"


ADVERSARIAL_NOTE = (
    "Policies: *N* phrases; *N*+R with the 10 regexes. NoBadWords and xgrammar `excludes` express literal "
    "phrases only: on *N*+R they get the phrases and nothing for the regexes. llguidance appears where its "
    "grammar could be built (see the compile table). Under the spec an invalid UTF-8 byte reads as U+FFFD and "
    "creates no match, so masking a token only because its bytes are invalid UTF-8 at that point counts as "
    "an over-block; the over-block column says how many were of that kind. The processors' trajectories "
    "differ once their masks differ (each appends its own argmax), so compare rates, not step-by-step counts.")


def adversarial_intro(cfg) -> str:
    """The paragraph that says how the adversarial leak / over-block numbers were made."""
    return (f"B=1, {cfg['adversarial_steps']} steps per processor and policy, the same seed and targets for every "
            "processor. Each step the adversary of `tests/test_adversarial.py` adds +100 to every token that "
            "extends the longest partial match of its target (' ' + a policy phrase, or a secret-like string the "
            "regexes forbid), in a random order, over all tokenizations; the processor runs; then each token is "
            "judged by the reference oracle (`find_violations`' `regex` semantics on the text of the bytes, U+FFFD "
            "for invalid bytes). *Leak*: an allowed token whose appending makes the text contain a match (checked: "
            f"every adversarial candidate + {cfg['adversarial_sample'] // 2:,} random allowed text tokens per step). "
            "*Over-block*: a masked text token whose appending would not (checked: every masked one, or "
            f"{cfg['adversarial_sample']:,} of them at random). *Completed*: generations in which the argmax "
            "actually produced forbidden text (a new generation then starts). Non-text ids (special tokens, EOS) "
            "are excluded from both checks.")


def adversarial_row(pol: str, label: str, r: dict) -> str:
    """One processor's row of the leak / over-block table."""
    if r.get("error"):
        return f"| {pol} | {label} | error: {r['error'][:160]} | | | | | | |"
    utf8 = f"; {r['overblocked_invalid_utf8']:,} of them invalid UTF-8" if r["overblocked_invalid_utf8"] else ""
    cells = [pct_of(r["leak_steps"], r["steps"]), pct_of(r["leaked"], r["allowed_checked"]),
             pct_of(r["overblock_steps"], r["steps"]), pct_of(r["overblocked"], r["masked_checked"]) + utf8,
             f"{r['masked_total'] / max(1, r['steps']):,.1f}", pct_of(r["wanted_masked"], r["wanted_total"]),
             f"{r['completed']} of {r['generations']} generations"]
    return f"| {pol} | {label} | " + " | ".join(cells) + " |"


def adversarial_notes(pol: str, label: str, proc: str, r: dict) -> list[str]:
    """The first leak / over-block / completed example of one processor, and any oracle disagreement."""
    notes = [f"- {pol}, {label}, first {kind}: after `{ex['text']!r}`, token {ex['token_id']} `'{ex['token']}'`"
             for kind, ex in r.get("examples", {}).items() if proc != "none" or kind != "completed"]
    if r.get("oracle_disagreements"):
        notes.append(f"- {pol}, {label}: the fast oracle disagreed with `find_violations` "
                     f"{r['oracle_disagreements']} times (a bug in the benchmark)")
    return notes


def render_adversarial(results) -> list[str]:
    """The leak / over-block section of the report (one table row per policy × processor)."""
    adv = results.get("adversarial") or {}
    if not adv:
        return []
    L = ["## Leak and over-block rates under the adversarial driver", "", adversarial_intro(results["config"]), "",
         ("| policy | processor | leak steps | leaked / allowed tokens checked | over-block steps | "
          "over-blocked / masked tokens checked | masked per step | adversary's tokens masked | "
          "completed forbidden texts |"),
         "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for pol, a in adv.items():
        if a.get("error"):
            L.append(f"| {pol} | — | {a['error'][:200]} | | | | | | |")
            continue
        for proc, r in a["by_processor"].items():
            phrases_only = proc in ("nobadwords", "xgrammar") and pol.endswith("+R")
            label = LABELS[proc] + (" (phrases only)" if phrases_only else "")
            L.append(adversarial_row(pol, label, r))
            notes += adversarial_notes(pol, label, proc, r)
    L += ["", ADVERSARIAL_NOTE]
    for pol in adv:
        x = results["compile"].get(pol, {}).get("xgrammar", {})
        if x.get("skipped") or x.get("error"):
            L += ["", f"xgrammar on {pol}: {(x.get('skipped') or x.get('error'))[:200]}."]
        elif x.get("compile_s") is not None:
            L += ["", (f"xgrammar {x['version']} compiled `excludes` for the {x['phrases']:,} phrases of policy "
                       f"{pol} in {x['compile_s']:.2f} s ({x['grammar']}).")]
    if notes:
        L += ["", ("Examples, the first of each kind per processor (the text before the step, then the token; "
                   "*completed*: the text before the token that produced the forbidden text):"), "", *notes]
    return [*L, ""]


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = results["config"]["batches"]
    sizes = results["config"]["sizes"]
    fig, axes = plt.subplots(1, len(batches), figsize=(6.2 * len(batches), 4.6), squeeze=False)
    colors = {"nobadwords": "tab:orange", "llguidance": "tab:red", "safedecode": "tab:blue",
              "none": "0.55", "temperature": "tab:green"}
    for ax, b in zip(axes[0], batches):
        for proc in ("nobadwords", "llguidance", "safedecode"):
            for suffix, style, marker in (("", "-", "o"), ("+R", "--", "s")):
                if proc == "nobadwords" and suffix:
                    continue
                xs, ys = [], []
                for n in sizes:
                    v = p50(results, proc, f"{n}{suffix}", b)
                    if v is not None:
                        xs.append(n)
                        ys.append(v)
                if xs:
                    label = LABELS[proc] + (" (+10 regexes)" if suffix else (" (phrases only)" if proc != "nobadwords" else ""))
                    ax.plot(xs, ys, style, marker=marker, color=colors[proc], label=label)
        for proc in ("none", "temperature"):
            v = p50(results, proc, "—", b)
            if v is not None:
                ax.axhline(v, color=colors[proc], linestyle=":", label=LABELS[proc])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(s) for s in sizes])
        ax.set_xlabel("forbidden phrases in the policy")
        ax.set_ylabel("p50 µs per step")
        ax.set_title(f"batch {b}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(f"Logits-processor time per decoding step, SmolLM2 vocabulary ({results['machine']['cpu_model']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
