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
* leak and over-block rates under the adversarial driver of tests/support/adversary.py (B=1, on the
  100 and 10+R policies): none, NoBadWords, llguidance, xgrammar ``excludes`` (literal phrases only;
  skipped if not importable) and safedecode, every verdict checked against the ``regex`` oracle.

Outputs: ``overhead.md`` (tables), ``overhead.json`` (every raw number, per-step samples included)
and ``overhead.png`` (p50 per step vs policy size).

The script is a list of scenarios (:func:`main`), each a function below; the workload, the
decoding loop and the compile measurement are ``benchmarks/harness.py``'s, shared with scale.py.
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import harness  # first: the offline environment, and the repository on sys.path

import numpy as np  # noqa: E402
import torch  # noqa: E402

import safedecode  # noqa: E402
from harness import REGEXES, SEED, fmt_us, log, summary  # noqa: E402
from tests.support.adversary import adversarial_steps  # noqa: E402
from tests.support.policy_oracle import PolicyOracle  # noqa: E402
from tests.support.text_oracle import adds_replacement_char, text_of  # noqa: E402

TARGETS = {"p50_us": 5.0, "p99_us": 25.0, "speedup_vs_llguidance": 50.0, "compile_s": 1.0, "cached_load_ms": 50.0}

PROCESSORS = ["none", "temperature", "nobadwords", "llguidance", "safedecode"]
LABELS = {"none": "none (identity call)", "temperature": "TemperatureLogitsWarper(0.7)",
          "nobadwords": "NoBadWordsLogitsProcessor", "llguidance": "llguidance", "xgrammar": "xgrammar (`excludes`)",
          "safedecode": "safedecode"}


# ------------------------------------------------------------------------------------ the peers
def identity(input_ids, scores):
    return scores


def lark_escape(phrase: str) -> str:
    """Escape a literal for a regex inside Lark's /.../ (also escapes '/')."""
    return "".join("\\" + c if c in "\\.+*?()|[]{}^$#&-~/" else c for c in phrase)


def lark_grammar(phrases: list[str], regexes: list[str]) -> str:
    alternatives = [lark_escape(p) for p in phrases] + [r.replace("/", "\\/") for r in regexes]
    return 'start: TEXT\nTEXT: /(?s:.*)/ & ~/(?s:.*)(' + "|".join(alternatives) + ')(?s:.*)/\n'


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


LLG_LIMITS = [
    ("default", None),
    ("raised: initial_lexer_fuel=1e8, step_lexer_fuel=2e7",
     dict(initial_lexer_fuel=100_000_000, step_lexer_fuel=20_000_000)),
    ("large: initial_lexer_fuel=1e9, step_lexer_fuel=1e9, max_lexer_states=1e7",
     dict(initial_lexer_fuel=1_000_000_000, step_lexer_fuel=1_000_000_000, max_lexer_states=10_000_000)),
]


@dataclass
class LLGuidance:
    """llguidance, set up once: its module, the tokenizer, the executor and the bitmask kernel."""

    ll: object
    tokenizer: object
    executor: object
    apply_fn: object

    def processor(self, template) -> LLGuidanceProcessor:
        return LLGuidanceProcessor(template, self.executor, self.apply_fn)


def llguidance_matcher(llg: LLGuidance, grammar: str, cap_s: float, rungs: int) -> tuple[object, dict]:
    """Build the matcher with llguidance's default parser limits; if that fails (at creation or on
    the first mask), retry with raised limits (the first ``rungs`` entries of LLG_LIMITS).
    Returns (template matcher or None, numbers)."""
    import llguidance.torch as llt

    ll, lltok = llg.ll, llg.tokenizer
    attempts = []
    for name, kwargs in LLG_LIMITS[:rungs]:
        limits = ll.LLParserLimits(**kwargs) if kwargs else None

        def build():
            return ll.LLMatcher(lltok, grammar, log_level=0, limits=limits)

        matcher, err, seconds = harness.run_with_cap(build, cap_s)
        attempt = {"limits": name, "create_s": seconds}
        if err is None and matcher.is_error():
            err = matcher.get_error().splitlines()[0][:300]
        if err is None:
            probe = matcher.deep_copy()
            bitmask = llt.allocate_token_bitmask(1, lltok.vocab_size)

            def first_mask():
                llt.fill_next_token_bitmask(probe, bitmask, 0)

            _, err2, seconds2 = harness.run_with_cap(first_mask, cap_s)
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


def bad_words_ids(tok, phrases: list[str]) -> list[list[int]]:
    """NoBadWords' sequences: ``encode(p)`` and ``encode(" " + p)`` of every phrase."""
    bad_words = []
    for p in phrases:
        for seq in (tok.encode(p, add_special_tokens=False), tok.encode(" " + p, add_special_tokens=False)):
            if seq and seq not in bad_words:
                bad_words.append(seq)
    return bad_words


# ------------------------------------------------------------------------------------ the run
@dataclass
class PolicySpec:
    """One policy of the run: ``n`` phrases, and the regexes for the ``+R`` ones."""

    name: str
    n: int
    regexes: list

    def build(self, phrases: list[str]) -> safedecode.Policy:
        return safedecode.Policy(forbid=[{"literal": p} for p in phrases[:self.n]] +
                                 [{"regex": r} for r in self.regexes])


@dataclass
class Workload:
    """The tokenizer and the seeded workload every scenario uses."""

    tok: object
    vocab: object
    phrases: list
    script: list
    prompt: list
    bases: object  # random logits, EOS at -inf

    @property
    def width(self) -> int:
        return len(self.tok)


class Run:
    """The options, the results (saved to ``overhead.json`` after every step of the way) and the
    timed streams of one run."""

    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.steps = args.steps or (100 if args.quick else 500)
        self.warmup = args.warmup if args.warmup is not None else (15 if args.quick else 50)
        self.cap_s = args.cap or (30.0 if args.quick else 90.0)
        self.adversarial = [p for p in args.adversarial_policies.split(",") if p]
        self.adv_steps = args.adversarial_steps or (40 if args.quick else 300)
        self.adv_sample = args.adversarial_sample or (400 if args.quick else 2000)
        self.sizes = [int(s) for s in args.sizes.split(",") if s]
        self.batches = [int(b) for b in args.batches.split(",") if b]
        self.processors = [p for p in args.processors.split(",") if p]
        self.seed = args.seed
        self.out_dir = Path(args.out)
        self.policies = [PolicySpec(str(n), n, []) for n in self.sizes]
        if not args.no_regex_policies:
            self.policies += [PolicySpec(f"{n}+R", n, REGEXES) for n in self.sizes]
        self.workload: Workload | None = None
        self.results: dict = {
            "config": {"quick": args.quick, "steps": self.steps, "warmup": self.warmup, "cap_s": self.cap_s,
                       "sizes": self.sizes, "batches": self.batches, "processors": self.processors, "seed": self.seed,
                       "regexes": REGEXES, "targets": TARGETS, "adversarial_policies": self.adversarial,
                       "adversarial_steps": self.adv_steps, "adversarial_sample": self.adv_sample},
            "machine": harness.machine_info(args.torch_threads)}

    def wants(self, processor: str) -> bool:
        return processor in self.processors

    def save(self) -> None:
        harness.write_json(self.out_dir / "overhead.json", self.results)

    def stream(self, proc, rows: int, desc: str) -> dict:
        w = self.workload
        return harness.run_stream(proc, batch=rows, prompt=w.prompt, script=w.script, bases=w.bases,
                                  warmup=self.warmup, steps=self.steps, cap_s=self.cap_s, desc=desc)

    def record(self, processor: str, policy: str, rows: int, run: dict, extra=None) -> None:
        """One timed stream into ``results["runs"]`` (and the log)."""
        entry = {"processor": processor, "policy": policy, "batch": rows, **harness.stream_record(run),
                 "copies_us": [round(x / 1e3, 3) for x in run["copies_ns"]]}
        entry.update(extra or {})
        self.results["runs"].append(entry)
        s = entry["summary"]
        log(f"  {processor:<12} {policy:<7} B={rows:<3} p50={fmt_us(s.get('p50_us'))} µs "
            f"p99={fmt_us(s.get('p99_us'))} µs n={s['n']} blocked={run['blocked_tokens']}{harness.stream_status(run)}")
        self.save()

    def record_setup_failure(self, processor: str, policy: str, rows: int, error: str) -> None:
        self.results["runs"].append({"processor": processor, "policy": policy, "batch": rows,
                                     "summary": {"n": 0}, "setup_failed": True, "error": error})

    def violations(self, policy, generated) -> dict:
        """Rows of a stream whose generated text violates ``policy`` (``find_violations``)."""
        rows_bad, total = 0, 0
        for row in generated:
            found = safedecode.find_violations(policy, self.workload.vocab.text(row))
            rows_bad += bool(found)
            total += len(found)
        return {"rows_with_violation": rows_bad, "violations": total}


# ------------------------------------------------------------------------------------ scenarios
def load_workload(run: Run) -> Workload:
    """SmolLM2's tokenizer, the seeded phrases, the scripted text, the chat prompt, random logits."""
    log("loading the SmolLM2-135M tokenizer ...")
    from safedecode.models import load_default_tokenizer

    t0 = time.perf_counter()
    tok = load_default_tokenizer()
    run.results["tokenizer"] = {"name": "SmolLM2-135M-Instruct", "vocab_size": len(tok),
                                "load_s": time.perf_counter() - t0, "eos_token_id": tok.eos_token_id}
    words = harness.vocabulary_words(tok)
    phrases = harness.make_phrases(words, max(run.sizes), run.seed)
    script = harness.make_script(tok, words, phrases, 4000, run.seed)
    prompt = harness.prompt_ids(tok)
    missing = sorted(set(run.adversarial) - {p.name for p in run.policies})
    if missing:
        log(f"adversarial policies not in this run, skipped: {missing}")
    run.results["workload"] = {"words_in_pool": len(words), "phrases": phrases, "prompt_tokens": len(prompt),
                               "script_tokens": len(script), "policies": [p.name for p in run.policies]}
    log(f"{len(words)} candidate words; {len(phrases)} phrases, e.g. {phrases[:4]}; script of {len(script)} tokens")
    # Random logits (a few rotating sets), EOS suppressed so that every stream runs its full length.
    bases = harness.random_logits(4, max(run.batches), len(tok), [tok.eos_token_id], run.seed)
    return Workload(tok, None, phrases, script, prompt, bases)


def warm_up_safedecode(run: Run, w: Workload) -> None:
    """First use: the vocabulary extraction, a tiny compile and every numba kernel signature."""
    from safedecode.tokens.vocabulary import vocabulary_of

    t0 = time.perf_counter()
    w.vocab = vocabulary_of(w.tok)
    first_use = {"vocabulary_extraction_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    tiny = harness.tiny_policy_compiled(w.tok)
    first_use["first_tiny_compile_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    harness.warm_kernels(tiny, w.prompt, w.width, run.batches)
    first_use["kernel_warmup_s"] = time.perf_counter() - t0
    harness.clear_memory_cache()
    run.results["safedecode_first_use"] = first_use
    log(f"safedecode first use: {first_use}")


def set_up_llguidance(run: Run, w: Workload) -> LLGuidance | None:
    """llguidance's tokenizer and executor, and its bitmask kernel warmed up (or the eager
    fallback); None where llguidance is not wanted or not available."""
    if not run.wants("llguidance"):
        return None
    try:
        import llguidance as ll
        import llguidance.hf
        import llguidance.torch as llt

        t0 = time.perf_counter()
        lltok = llguidance.hf.from_tokenizer(w.tok)
        setup = {"version": ll.__version__, "tokenizer_s": time.perf_counter() - t0, "vocab_size": lltok.vocab_size}
        apply_fn, apply_name = llt.apply_token_bitmask_inplace, "llguidance.torch.apply_token_bitmask_inplace (torch.compile)"
        t0 = time.perf_counter()
        try:
            for rows in run.batches:
                for _ in range(2):
                    apply_fn(torch.zeros((rows, w.width)), llt.allocate_token_bitmask(rows, w.width))
        except Exception as exc:  # noqa: BLE001 - no compiler: same arithmetic, eager
            setup["apply_compile_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            apply_fn, apply_name = eager_apply_bitmask, "eager torch (fallback)"
        setup["apply_warmup_s"] = time.perf_counter() - t0
        setup["apply"] = apply_name
        run.results["llguidance_setup"] = setup
        log(f"llguidance {ll.__version__}: tokenizer {setup['tokenizer_s']:.2f} s, "
            f"apply kernel warm-up {setup['apply_warmup_s']:.1f} s ({apply_name})")
        return LLGuidance(ll, lltok, ll.LLExecutor(), apply_fn)
    except Exception as exc:  # noqa: BLE001
        run.results["llguidance_setup"] = {"error": f"{type(exc).__name__}: {exc}"}
        log(f"llguidance unavailable: {exc}")
        return None


def time_policy_free_peers(run: Run) -> None:
    """The identity call and TemperatureLogitsWarper, once per batch size."""
    from transformers import TemperatureLogitsWarper

    for name, make in (("none", lambda: identity), ("temperature", lambda: TemperatureLogitsWarper(0.7))):
        if run.wants(name):
            for rows in run.batches:
                run.record(name, "—", rows, run.stream(make(), rows, f"{name} B={rows}"))


def compile_safedecode(run: Run, policy: PolicySpec, sd_policy, entry: dict, tmp_root: Path):
    """Cold compile, cached loads and table size of one policy into ``entry``; the compiled policy
    or None."""
    try:
        compiled, info = harness.safedecode_compile(sd_policy, run.workload.tok, tmp_root)
    except Exception as exc:  # noqa: BLE001
        entry["safedecode"] = {"error": f"{type(exc).__name__}: {exc}"}
        log(f"  safedecode compile FAILED: {exc}")
        return None
    entry["safedecode"] = info
    s = info["stats"]
    log(f"  safedecode compile {info['cold_compile_s']:.2f} s, cached load "
        f"{min(info['cached_load_s']) * 1e3:.1f} ms (hit={info['cached_load_hit']}), "
        f"{s.get('table_bytes', 0) / 1e6:.1f} MB, {s.get('token_states')} token states, "
        f"{s.get('components', 1)} component(s)")
    return compiled


def build_llguidance(run: Run, llg: LLGuidance | None, policy: PolicySpec, entry: dict):
    """llguidance's matcher for the policy's Lark grammar (retried with raised limits) into
    ``entry``; the template matcher or None."""
    if llg is None:
        return None
    grammar = lark_grammar(run.workload.phrases[:policy.n], policy.regexes)
    template, info = llguidance_matcher(llg, grammar, run.cap_s, 2 if run.quick else len(LLG_LIMITS))
    info["grammar_chars"] = len(grammar)
    entry["llguidance"] = info
    if template is None:
        log(f"  llguidance matcher FAILED: {info.get('error')}")
    else:
        log(f"  llguidance matcher {info['create_s'] * 1e3:.0f} ms, first mask "
            f"{(info['first_mask_s'] or 0) * 1e3:.0f} ms (limits: {info['limits']})")
    return template


def time_policy_peers(run: Run, policy: PolicySpec, sd_policy, entry: dict, bad_words, llg, template, compiled) -> None:
    """NoBadWords (phrase policies only: regexes are not expressible), llguidance and safedecode,
    at every batch size; the output of each stream judged by ``find_violations``."""
    from transformers import NoBadWordsLogitsProcessor

    tok = run.workload.tok
    for rows in run.batches:
        if run.wants("nobadwords") and not policy.regexes:  # '+R' rows would repeat these
            nbw = NoBadWordsLogitsProcessor(bad_words, eos_token_id=tok.eos_token_id)
            stream = run.stream(nbw, rows, f"nobadwords {policy.name} B={rows}")
            run.record("nobadwords", policy.name, rows, stream,
                       {"violations": run.violations(sd_policy, stream["generated"])})
        if run.wants("llguidance"):
            if template is None:
                run.record_setup_failure("llguidance", policy.name, rows,
                                         entry.get("llguidance", {}).get("error", "unavailable"))
            else:
                proc = llg.processor(template)
                stream = run.stream(proc, rows, f"llguidance {policy.name} B={rows}")
                parts = {k: summary(v[run.warmup:]) for k, v in proc.parts.items()}
                run.record("llguidance", policy.name, rows, stream,
                           {"parts": parts, "violations": run.violations(sd_policy, stream["generated"])})
        if run.wants("safedecode"):
            if compiled is None:
                run.record_setup_failure("safedecode", policy.name, rows,
                                         entry.get("safedecode", {}).get("error") or "compile failed")
            else:
                stream = run.stream(safedecode.SafeLogitsProcessor(compiled), rows,
                                    f"safedecode {policy.name} B={rows}")
                run.record("safedecode", policy.name, rows, stream,
                           {"violations": run.violations(sd_policy, stream["generated"])})


def peer_factories(tok, bad_words, llg, template, xgr_make, compiled) -> dict:
    """name → factory of a fresh B=1 processor, for every peer built for this policy (llguidance and
    xgrammar only where they could be built)."""
    from transformers import NoBadWordsLogitsProcessor

    nbw = NoBadWordsLogitsProcessor(bad_words, eos_token_id=tok.eos_token_id)
    factories = {"none": lambda: identity, "nobadwords": lambda: nbw}
    if template is not None:
        factories["llguidance"] = lambda: llg.processor(template)
    if xgr_make is not None:
        factories["xgrammar"] = xgr_make
    factories["safedecode"] = lambda: safedecode.SafeLogitsProcessor(compiled)
    return factories


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


def spellings(tok, phrase: str, single: dict) -> dict:
    """Four token spellings of ' ' + phrase (or the phrase at the start); ``single`` memoizes the
    characters that are one token."""
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

    k = max(1, len(phrase) // 2)
    return {"canonical ' '+phrase (in bad_words_ids)": tok.encode(" " + phrase, add_special_tokens=False),
            "canonical phrase at start (in bad_words_ids)": tok.encode(phrase, add_special_tokens=False),
            "one token per character": char_ids(" " + phrase),
            "split mid-phrase (two encodes)": (tok.encode(" " + phrase[:k], add_special_tokens=False) +
                                               tok.encode(phrase[k:], add_special_tokens=False))}


def leak_check(tok, vocab, phrases, factories: dict, prompt) -> dict:
    """For each phrase, four spellings (:func:`spellings`); a spelling is *blocked* by a processor
    (``factories``: name → factory of fresh processors) if at some step along it the processor masks
    its next token."""
    single: dict = {}
    totals: dict = {}
    example = None
    for i, p in enumerate(phrases):
        for name, seq in spellings(tok, p, single).items():
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


def run_leak_check(run: Run, phrases, factories: dict) -> None:
    """:func:`leak_check` for every peer but 'none' into ``results["leak"]`` (an error is recorded)."""
    w = run.workload
    log(f"  leak check ({len(phrases)}-phrase policy) ...")
    try:
        run.results["leak"] = leak_check(w.tok, w.vocab, phrases, {k: f for k, f in factories.items() if k != "none"},
                                         w.prompt)
        for name, row in run.results["leak"]["by_spelling"].items():
            counts = ", ".join(f"{k} {row[k]}/{row['n']}" for k in row if k not in ("n", "skipped"))
            log(f"    {name}: blocked {counts}")
    except Exception as exc:  # noqa: BLE001
        run.results["leak"] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        log(f"    leak check failed: {exc}")


def adversary_targets(phrases: list[str], regexes: list[str], oracle: PolicyOracle, seed: int) -> dict:
    """What the adversary pushes toward: ' ' + each phrase, and (with regexes) 200 secret-like
    strings that the policy forbids (``harness.secret_like``, kept only if they violate)."""
    rng = np.random.default_rng(seed + 2)
    secrets = []
    for _ in range(200 if regexes else 0):
        s = harness.secret_like(rng)
        if oracle(s.encode()):
            secrets.append(s.encode())
    return {"phrases": [(" " + p).encode() for p in phrases], "secrets": secrets}


COUNTS = ("steps", "masked_total", "wanted_total", "wanted_masked", "masked_checked", "overblocked",
          "overblock_steps", "overblocked_invalid_utf8", "allowed_checked", "leaked", "leak_steps")


def adversarial_run(make, vocab, oracle: PolicyOracle, targets: dict, *, prompt, steps, sample, seed,
                    policy) -> dict:
    """Drive fresh processors from ``make()`` with the adversary of tests/support/adversary.py (B=1;
    non-text ids at -inf) and count leaks, over-blocks and completed forbidden texts: every masked
    text token judged (or ``sample`` of them), the candidates and ``sample``/2 random text tokens."""
    st = {"generations": 0, "completed": 0, "oracle_disagreements": 0, "examples": {}}
    st.update({key: 0 for key in COUNTS})

    def example(kind, data, token):
        st["examples"].setdefault(kind, {"text": text_of(data)[-60:],
                                         "token": vocab.token_bytes[token].decode("utf-8", "backslashreplace"),
                                         "token_id": token})

    pools = [targets["phrases"], targets["secrets"]]
    for step in adversarial_steps(make, vocab, pools, oracle, steps=steps, seed=seed, prompt=prompt,
                                  masked_sample=sample, allowed_sample=sample // 2, mask_non_text=True):
        st["generations"] += step.starts_generation
        wanted = set(step.wanted)
        st["steps"] += 1
        st["masked_total"] += len(step.masked)
        st["wanted_total"] += len(wanted)
        st["wanted_masked"] += len(wanted & step.masked)
        st["masked_checked"] += step.masked_checked
        st["overblocked"] += len(step.overblocked)
        st["overblock_steps"] += bool(step.overblocked)
        st["overblocked_invalid_utf8"] += sum(adds_replacement_char(step.data, vocab.token_bytes[t])
                                              for t in step.overblocked)
        st["allowed_checked"] += step.allowed_checked
        st["leaked"] += len(step.leaked)
        st["leak_steps"] += bool(step.leaked)
        if step.overblocked:
            example("over-block", step.data, step.overblocked[0])
        if step.leaked:
            example("leak", step.data, step.leaked[0])
        if step.completed:
            st["completed"] += 1
            example("completed", step.data, step.choice)
        st["oracle_disagreements"] += step.completed != bool(safedecode.find_violations(policy, text_of(step.after)))
    n = max(1, st["steps"])
    st.update(leak_step_rate=st["leak_steps"] / n, overblock_step_rate=st["overblock_steps"] / n,
              leak_token_rate=st["leaked"] / max(1, st["allowed_checked"]),
              overblock_token_rate=st["overblocked"] / max(1, st["masked_checked"]))
    return st


def adversarial_check(run: Run, policy: PolicySpec, sd_policy, factories: dict) -> dict:
    """:func:`adversarial_run` for each processor (name → factory), same seed and targets for all."""
    w = run.workload
    oracle = PolicyOracle(sd_policy)
    targets = adversary_targets(w.phrases[:policy.n], policy.regexes, oracle, run.seed)
    out = {"steps": run.adv_steps, "sample": run.adv_sample, "targets": {k: len(v) for k, v in targets.items()},
           "target_examples": [t.decode() for t in targets["phrases"][:3] + targets["secrets"][:5]],
           "by_processor": {}}
    for name, make in factories.items():
        t0 = time.perf_counter()
        try:
            r = adversarial_run(make, w.vocab, oracle, targets, prompt=w.prompt, steps=run.adv_steps,
                                sample=run.adv_sample, seed=run.seed, policy=sd_policy)
        except Exception as exc:  # noqa: BLE001 - recorded, the other processors still run
            r = {"error": f"{type(exc).__name__}: {exc}"}
        r["wall_s"] = time.perf_counter() - t0
        out["by_processor"][name] = r
        log(f"    adversarial {name:<11} " + (r["error"][:160] if "error" in r else
            f"leak steps {r['leak_steps']}/{r['steps']}, leaked tokens {r['leaked']}/{r['allowed_checked']}, "
            f"over-block steps {r['overblock_steps']}/{r['steps']}, over-blocked {r['overblocked']}/"
            f"{r['masked_checked']} checked, completed {r['completed']}/{r['generations']} ({r['wall_s']:.0f} s)"))
    return out


def bench_policy(run: Run, policy: PolicySpec, llg: LLGuidance | None, xgrammar_makers: dict, tmp_root: Path) -> None:
    """One policy: compile safedecode, build llguidance's matcher and NoBadWords' sequences, time
    every peer at every batch size, then (on the 100-phrase and the adversarial policies) the leak
    check and the adversarial driver."""
    w = run.workload
    log(f"policy {policy.name}: {policy.n} phrases + {len(policy.regexes)} regexes")
    sd_policy = policy.build(w.phrases)
    entry = run.results["compile"].setdefault(policy.name, {"phrases": policy.n, "regexes": len(policy.regexes)})
    compiled = None
    adversarial = policy.name in run.adversarial
    if run.wants("safedecode") or policy.n == 100 or adversarial:
        compiled = compile_safedecode(run, policy, sd_policy, entry, tmp_root)
    run.save()
    template = build_llguidance(run, llg, policy, entry)
    bad_words = bad_words_ids(w.tok, w.phrases[:policy.n])
    entry["nobadwords_sequences"] = len(bad_words)
    run.save()
    time_policy_peers(run, policy, sd_policy, entry, bad_words, llg, template, compiled)

    leak_due = policy.n == 100 and not policy.regexes and run.results["leak"] is None
    if compiled is not None and (leak_due or adversarial):
        if not run.args.no_xgrammar and policy.n not in xgrammar_makers:
            log(f"  xgrammar: compiling `excludes` for {policy.n} phrases ...")
            xgrammar_makers[policy.n] = harness.xgrammar_build(w.tok, w.phrases[:policy.n], run.cap_s)
            x = xgrammar_makers[policy.n][1]
            compiled_in = f"compiled in {x['compile_s']:.2f} s" if x.get("compile_s") is not None else ""
            log(f"  xgrammar: {x.get('skipped') or x.get('error') or compiled_in}")
        xgr_make, xgr_info = xgrammar_makers.get(policy.n, (None, {"skipped": "--no-xgrammar"}))
        entry["xgrammar"] = xgr_info
        factories = peer_factories(w.tok, bad_words, llg, template, xgr_make, compiled)
        if leak_due:
            run_leak_check(run, w.phrases[:policy.n], factories)
        if adversarial:
            log(f"  adversarial driver ({policy.name}: {run.adv_steps} steps per processor) ...")
            run.results["adversarial"][policy.name] = adversarial_check(run, policy, sd_policy, factories)
    del compiled, template
    harness.clear_memory_cache()
    gc.collect()
    run.save()


def write_outputs(run: Run, t_run: float) -> None:
    """The targets check, then overhead.json, overhead.md and overhead.png."""
    results = run.results
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    results["total_wall_s"] = time.perf_counter() - t_run
    results["targets_met"] = evaluate_targets(results)
    run.save()
    harness.write_text(run.out_dir / "overhead.md", render_markdown(results))
    try:
        plot(results, run.out_dir / "overhead.png")
    except Exception as exc:  # noqa: BLE001
        log(f"plot failed: {exc}")
    log(f"done in {results['total_wall_s']:.0f} s: {run.out_dir / 'overhead.md'}, overhead.json, overhead.png")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced CI-sized run (fewer steps)")
    ap.add_argument("--out", default=str(harness.RESULTS), help="output directory")
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
    unknown = {p for p in args.processors.split(",") if p} - set(PROCESSORS)
    if unknown:
        ap.error(f"unknown processors {sorted(unknown)}; choose from {PROCESSORS}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    run = Run(args)
    run.out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(args.seed)
    t_run = time.perf_counter()

    run.workload = load_workload(run)
    warm_up_safedecode(run, run.workload)
    llg = set_up_llguidance(run, run.workload)
    run.save()

    tmp_root = Path(tempfile.mkdtemp(prefix="safedecode-bench-"))
    run.results.update(compile={}, runs=[], leak=None, adversarial={})
    time_policy_free_peers(run)
    xgrammar_makers: dict = {}  # phrase count → (factory or None, numbers)
    for policy in run.policies:
        bench_policy(run, policy, llg, xgrammar_makers, tmp_root)
    shutil.rmtree(tmp_root, ignore_errors=True)

    write_outputs(run, t_run)
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
    """overhead.md: the sections below, in order."""
    cfg, m = results["config"], results["machine"]
    lines = ["# safedecode: per-step overhead vs peers", ""]
    lines.append(f"{'Quick (CI-sized)' if cfg['quick'] else 'Full'} run, {m['date']}; "
                 f"{cfg['steps']} timed steps per configuration after {cfg['warmup']} warm-up steps; "
                 f"SmolLM2-135M-Instruct vocabulary ({results['tokenizer']['vocab_size']:,} tokens), float32 CPU logits. "
                 f"Times are wall-clock µs per processor call (`time.perf_counter_ns`), GC disabled during the loop. "
                 f"Policies: *N* phrases; *N*+R = the same phrases plus 10 secret-like regexes.")
    lines.append("")
    for section in (render_per_step, render_speedup, render_compile, render_leak_check, render_adversarial,
                    render_targets, render_machine):
        lines += section(results)
    return "\n".join(lines)


def render_per_step(results) -> list[str]:
    """The per-step time table: every processor × policy, p50/p99 per batch size."""
    cfg = results["config"]
    batches = cfg["batches"]
    policies = results["workload"]["policies"]
    lines = ["## Per-step time (µs)", ""]
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
    return lines


def render_speedup(results) -> list[str]:
    """llguidance ÷ safedecode per policy and batch size, and llguidance's per-step breakdown."""
    if not (any(r["processor"] == "llguidance" for r in results["runs"])
            and any(r["processor"] == "safedecode" for r in results["runs"])):
        return []
    batches = results["config"]["batches"]
    lines = ["## llguidance ÷ safedecode (p50)", ""]
    lines.append("| policy | " + " | ".join(f"B={b}" for b in batches) + " |")
    lines.append("|---|" + "---|" * len(batches))
    for pol in results["workload"]["policies"]:
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
    return lines


def render_compile(results) -> list[str]:
    """Compile, load and size of every policy: safedecode, llguidance, NoBadWords."""
    lines = ["## Compile, load and size", ""]
    lines.append("| policy | safedecode cold compile (s) | cached load (ms) | table (MB) | components | DFA states | token states | other table stats | llguidance matcher (ms) | llguidance first mask (ms) | llguidance limits | NoBadWords sequences |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for pol in results["workload"]["policies"]:
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
    return lines


def render_leak_check(results) -> list[str]:
    """Which peers block the four spellings of each phrase of the 100-phrase policy."""
    leak = results.get("leak")
    if not leak:
        return []
    if leak.get("error"):
        return ["## Leak check", "", f"failed: {leak['error']}", ""]
    lines = ["## Leak check (100-phrase policy)", ""]
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
    return lines


def render_targets(results) -> list[str]:
    """Each target, met or not, from the measured numbers."""
    lines = ["## Targets", ""]
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
    return lines


def render_machine(results) -> list[str]:
    m = results["machine"]
    lines = ["## Machine", ""]
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
    return lines


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
            "processor. Each step the adversary of `tests/support/adversary.py` adds +100 to every token that "
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
    """p50 per step vs policy size, one panel per batch size."""
    plt = harness.pyplot()
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
    harness.save_figure(fig, path, dpi=130)


if __name__ == "__main__":
    sys.exit(main())
