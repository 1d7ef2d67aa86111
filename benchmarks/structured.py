#!/usr/bin/env python
"""Structured outputs: per-step mask cost and compile time of safedecode's output types next to
outlines-core, xgrammar and llguidance, in one run, on SmolLM2's 49,152-token vocabulary.

    .venv/bin/python benchmarks/structured.py            # ~5 min on a lightly loaded 2-core machine
    .venv/bin/python benchmarks/structured.py --reps 5   # quicker, noisier
    .venv/bin/python benchmarks/structured.py --out DIR  # default: benchmarks/results → structured.{md,json,png}

Three JSON schemas (a flat person/address record; a nested order with an array of item objects,
enums and a $ref; a tool call creating a GitHub issue with optional fields, string patterns and a
date format), each

* WITHOUT a policy: safedecode ``output_type(schema).policy()``; outlines-core ``Index`` of
  ``build_regex_from_schema`` + ``Guide``; xgrammar ``compile_json_schema`` + ``GrammarMatcher``;
  llguidance ``LLMatcher`` on ``grammar_from_json_schema`` (its native JSON grammar) and, for
  reference, on the same regex as safedecode's document rule as one lexeme;
* WITH the shipped ``secrets`` policy (``safedecode.load_policy("secrets")``): safedecode
  ``output_type(schema).policy(secrets)`` (one product automaton); llguidance one lexeme
  ``DOC: /schema regex/ & ~/(?s:.*)(secret1|secret2|…)(?s:.*)/``; outlines-core and xgrammar
  cannot express "schema AND contains no match of these regexes" (no complement or intersection
  in their regexes/grammars) — the table says so instead of a number.

Measured: cold compile (no caches; safedecode's vocabulary already extracted, every peer's tokenizer
adapter built once beforehand — those one-time costs are printed apart), and the per-step cost of a
B=1 logits processor walking a fixed valid document's canonical tokens: each step consumes the
token chosen last step, computes the mask and applies it to a (1, 49152) float32 logits row (a
fresh copy of random logits, copied outside the timer). The walk has len(tokens)+1 steps (the last
one must allow EOS). One untimed walk first (lazy lexers, kernel warm-up: its wall time is
recorded as *first walk*), then ``--reps`` timed walks with fresh matchers; for each step the
median (and the minimum) over repetitions is taken, and p50/p99 are over the steps of the walk.

Correctness inside the run: at every step of every walk the document's next token must be left
allowed and EOS must be allowed at the end (a refusal is reported, and that engine's timing is
marked); probe documents (a valid value the grammar should accept, one carrying a fake AWS key)
record which engines accept them.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import harness  # first: the offline environment, and the repository on sys.path

harness.one_omp_thread()

import numpy as np
import torch
from harness import fmt_us, log, summary

import safedecode

# The schemas and the walked documents live in harness.py (step_breakdown.py walks them too).
from harness import DOCUMENTS, SCHEMAS  # noqa: E402

SCHEMA_LABELS = {"person": "person (flat record)", "order": "order (nested, array of objects, enums, $ref)",
                 "issue": "issue tool call (optional fields, patterns, date)"}

FAKE_KEY = "AKIAIOSFODNN7EXAMPLE"  # AWS's documentation example: secrets.toml forbids its shape


def probe_documents() -> list[dict]:
    """Extra documents each engine is asked to accept or refuse (whole walk; not timed)."""
    person_escape = dict(DOCUMENTS["person"], name="Ada \"Countess\" Lovelace")
    issue_escape = copy.deepcopy(DOCUMENTS["issue"])
    issue_escape["arguments"]["title"] = "Crash on \"null\" tool arguments"
    person_key = dict(DOCUMENTS["person"], street=f"12 {FAKE_KEY} Road")
    order_key = copy.deepcopy(DOCUMENTS["order"])
    order_key["customer"]["name"] = f"key {FAKE_KEY}"
    issue_key = copy.deepcopy(DOCUMENTS["issue"])
    issue_key["arguments"]["body"] = f"CI fails since the key {FAKE_KEY} was rotated."
    return [
        {"schema": "person", "name": "escape \\\" in a maxLength string (valid JSON of the schema)",
         "value": person_escape, "valid": True, "secret": False},
        {"schema": "issue", "name": "escape \\\" in a maxLength string (valid JSON of the schema)",
         "value": issue_escape, "valid": True, "secret": False},
        {"schema": "person", "name": f"fake AWS key {FAKE_KEY} in a string", "value": person_key,
         "valid": True, "secret": True},
        {"schema": "order", "name": f"fake AWS key {FAKE_KEY} in a string", "value": order_key,
         "valid": True, "secret": True},
        {"schema": "issue", "name": f"fake AWS key {FAKE_KEY} in a string", "value": issue_key,
         "valid": True, "secret": True},
    ]


# Keywords a peer accepts that safedecode refuses (checked in the run, not assumed).
REFUSED_VARIANTS = [
    ("order", "items[].quantity: minimum 1", lambda s: s["properties"]["items"]["items"]["properties"]["quantity"]
     .update(minimum=1)),
    ("issue", "arguments.labels: uniqueItems", lambda s: s["properties"]["arguments"]["properties"]["labels"]
     .update(uniqueItems=True)),
    ("person", "age: minimum 0, maximum 150", lambda s: s["properties"]["age"].update(minimum=0, maximum=150)),
]

ENGINES = ["safedecode", "outlines-core", "xgrammar", "llguidance", "llguidance-regex"]
ENGINE_LABELS = {
    "safedecode": "safedecode",
    "outlines-core": "outlines-core (Index/Guide)",
    "xgrammar": "xgrammar (compile_json_schema)",
    "llguidance": "llguidance (JSON schema grammar)",
    "llguidance-regex": "llguidance (schema regex as one lexeme)",
}
NOT_EXPRESSIBLE = {
    "outlines-core": "n/a: its regex has no complement/intersection, so \"schema AND no secret\" is not expressible",
    "xgrammar": "n/a: no complement/intersection in its EBNF/regex (structural-tag `excludes` is literal-only text, not inside a JSON schema)",
    "llguidance": "n/a: its JSON-schema grammar cannot be intersected with a negated regex (`&~` joins lexemes only): see the lexeme row",
}

LLG_LIMITS = [
    ("default", None),
    ("raised: initial_lexer_fuel=1e8, step_lexer_fuel=2e7",
     dict(initial_lexer_fuel=100_000_000, step_lexer_fuel=20_000_000)),
    ("large: initial_lexer_fuel=1e9, step_lexer_fuel=1e9, max_lexer_states=1e7",
     dict(initial_lexer_fuel=1_000_000_000, step_lexer_fuel=1_000_000_000, max_lexer_states=10_000_000)),
]


# ------------------------------------------------------------------------------------ processors
def safedecode_walker(compiled, prompt):
    def make():
        proc = safedecode.SafeLogitsProcessor(compiled)
        state = {"ids": torch.tensor([prompt], dtype=torch.long)}

        def prepare(last):  # untimed: input_ids grows by one column, as in model.generate
            if last is not None:
                state["ids"] = torch.cat([state["ids"], torch.tensor([[last]])], dim=1)

        def step(scores):
            proc(state["ids"], scores)

        return prepare, step
    return make


def outlines_walker(index, vocab_size):
    from outlines_core import Guide
    from outlines_core.kernels.torch import (
        allocate_token_bitmask,
        apply_token_bitmask_inplace,
        fill_next_token_bitmask,
    )

    def make():
        guide = Guide(index)
        mask = allocate_token_bitmask(vocab_size)
        pending = {"last": None}

        def prepare(last):
            pending["last"] = last

        def step(scores):
            if pending["last"] is not None:
                guide.advance(token_id=pending["last"], return_tokens=False)
            fill_next_token_bitmask(guide, mask)
            apply_token_bitmask_inplace(scores, mask)

        return prepare, step
    return make


def xgrammar_walker(xgr, compiled, vocab_size):
    def make():
        matcher = xgr.GrammarMatcher(compiled)
        bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        pending = {"last": None}

        def prepare(last):
            pending["last"] = last

        def step(scores):
            if pending["last"] is not None and not matcher.accept_token(pending["last"]):
                raise RuntimeError(f"xgrammar refused token {pending['last']}")
            matcher.fill_next_token_bitmask(bitmask)
            xgr.apply_token_bitmask_inplace(scores, bitmask)

        return prepare, step
    return make


def llguidance_walker(llt, template, vocab_size):
    def make():
        matcher = template.deep_copy()
        bitmask = llt.allocate_token_bitmask(1, vocab_size)
        pending = {"last": None}

        def prepare(last):
            pending["last"] = last

        def step(scores):
            if pending["last"] is not None and not matcher.consume_token(pending["last"]):
                raise RuntimeError(f"llguidance refused token {pending['last']}: {matcher.get_error()[:200]}")
            llt.fill_next_token_bitmask(matcher, bitmask, 0)
            llt.apply_token_bitmask_inplace(scores, bitmask)
            if matcher.is_error():
                raise RuntimeError(f"llguidance matcher error: {matcher.get_error()[:300]}")

        return prepare, step
    return make


def walk(make, tokens, logits_row, eos_id, timed=True):
    """Walk ``tokens`` (+ one final step that must allow EOS). Returns (ns per step, problem or None)."""
    prepare, step = make()
    scores = torch.empty_like(logits_row)
    times = []
    gc.collect()
    gc.disable()
    try:
        for k in range(len(tokens) + 1):
            prepare(tokens[k - 1] if k else None)
            scores.copy_(logits_row)
            t0 = time.perf_counter_ns()
            step(scores)
            t1 = time.perf_counter_ns()
            times.append(t1 - t0)
            want = tokens[k] if k < len(tokens) else eos_id
            if not bool(torch.isfinite(scores[0, want])):
                what = "EOS at the end" if k == len(tokens) else f"token {want} at step {k}"
                return times, f"masked {what}"
    except Exception as exc:  # noqa: BLE001 - reported
        return times, f"{type(exc).__name__}: {str(exc)[:300]}"
    finally:
        gc.enable()
    return times, None


# ------------------------------------------------------------------------------------ building
def lark_regex(pattern: str) -> str:
    """``pattern`` inside Lark's /.../ (an unescaped '/' gets a backslash)."""
    out, i = [], 0
    while i < len(pattern):
        if pattern[i] == "\\":
            out.append(pattern[i:i + 2])
            i += 2
            continue
        out.append("\\/" if pattern[i] == "/" else pattern[i])
        i += 1
    return "/" + "".join(out) + "/"


LEADING = "(?:^|[^0-9A-Za-z_-])"


def llguidance_negation(policy) -> str:
    """The secrets policy as one regex of "contains a match", for llguidance (no anchors there).

    Each secrets rule starts with ``(?:^|[^0-9A-Za-z_-])``; inside a document, which starts with
    '{' or '"', the ``^`` branch can never match, so it is dropped. The JSON-escaped companion rules
    safedecode adds are left out: every escaped spelling they match (\\A, '"', '\\"' or '\\\\'
    before the key) contains a match of the plain rule, since '"' and '\\' are in the class."""
    parts = []
    for rule in policy.forbid:
        pattern = rule.pattern
        if "^" in pattern.replace(LEADING, ""):
            raise ValueError(f"rule {rule.pattern!r}: an anchor this translation does not handle")
        parts.append(pattern.replace(LEADING, "[^0-9A-Za-z_-]"))
    return "(?s:.*)(?:" + "|".join(parts) + ")(?s:.*)"


def llguidance_build(ll, llt, lltok, grammar, tokens, logits_row, eos_id, limits_ladder):
    """An LLMatcher that walks ``tokens``, trying raised parser limits when the default ones fail
    (at creation or during the walk). Returns (template or None, info)."""
    attempts = []
    for name, kwargs in limits_ladder:
        limits = ll.LLParserLimits(**kwargs) if kwargs else None
        gc.collect()
        t0 = time.perf_counter()
        matcher = ll.LLMatcher(lltok, grammar, log_level=0, limits=limits)
        create_s = time.perf_counter() - t0
        attempt = {"limits": name, "create_s": create_s}
        if matcher.is_error():
            attempt["error"] = matcher.get_error().splitlines()[0][:300]
            attempts.append(attempt)
            continue
        probe = matcher.deep_copy()
        bitmask = llt.allocate_token_bitmask(1, logits_row.shape[-1])
        t0 = time.perf_counter()
        llt.fill_next_token_bitmask(probe, bitmask, 0)
        attempt["first_mask_s"] = time.perf_counter() - t0
        attempt["compile_s"] = create_s + attempt["first_mask_s"]
        times, problem = walk(llguidance_walker(llt, matcher, logits_row.shape[-1]), tokens, logits_row, eos_id)
        attempt["first_walk_s"] = sum(times) / 1e9
        attempt["error"] = problem
        attempts.append(attempt)
        if problem is None or "too many" not in problem and "fuel" not in problem.lower() and "Lexer" not in problem:
            return matcher, {"attempts": attempts, **attempt}
    return None, {"attempts": attempts, **attempts[-1]}


def stats_of(reps_ns: list[list[int]]) -> dict:
    """Per-step median and minimum over repetitions; p50/p99 over the walk's steps of each."""
    arr = np.asarray(reps_ns, dtype=np.float64)  # reps × steps
    med, mn = np.median(arr, axis=0), arr.min(axis=0)
    return {"steps": int(arr.shape[1]), "reps": int(arr.shape[0]),
            "median_of_reps": summary(med), "min_of_reps": summary(mn),
            "pooled": summary(arr.ravel()),
            "walk_total_ms_median": float(np.median(arr.sum(axis=1)) / 1e6),
            "per_step_median_us": [round(x / 1e3, 3) for x in med]}


# ------------------------------------------------------------------------------------ the run
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=15, help="timed walks per engine and case (default 15)")
    ap.add_argument("--compile-reps", type=int, default=3,
                    help="cold compiles per peer (best and all kept; safedecode: --sd-compile-reps)")
    ap.add_argument("--sd-compile-reps", type=int, default=2, help="cold safedecode compiles per case (default 2)")
    ap.add_argument("--schemas", default="person,order,issue")
    ap.add_argument("--policy", default="secrets", help="the shipped policy to combine (default secrets)")
    ap.add_argument("--out", type=Path, default=harness.RESULTS)
    ap.add_argument("--seed", type=int, default=harness.SEED)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_run = time.perf_counter()
    results: dict = {"machine": harness.machine_info(1), "args": {k: str(v) for k, v in vars(args).items()},
                     "cases": [], "probes": [], "refused_variants": [], "setup": {}}
    from safedecode.channels.output_types import OutputTypeError, output_type
    from safedecode.models import load_default_tokenizer
    from safedecode.tokens.vocabulary import vocabulary_of

    log("loading the SmolLM2-135M tokenizer ...")
    tok = load_default_tokenizer()
    V, eos = len(tok), tok.eos_token_id
    prompt = harness.prompt_ids(tok)
    logits_row = (torch.randn((1, V), generator=torch.Generator().manual_seed(args.seed)) * 4.0).float()
    setup = results["setup"]
    t0 = time.perf_counter()
    vocab = vocabulary_of(tok)
    setup["safedecode_vocabulary_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    harness.warm_kernels(harness.tiny_policy_compiled(tok), prompt, V, [1])
    setup["safedecode_first_use_s"] = time.perf_counter() - t0
    harness.clear_memory_cache()
    policy = safedecode.load_policy(args.policy)

    # Peers' one-time set-up.
    import importlib.metadata as md

    from outlines_core import Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    t0 = time.perf_counter()
    by_bytes: dict = {}
    for i, b in enumerate(vocab.token_bytes):
        if b is not None and i != eos:
            by_bytes.setdefault(b, []).append(i)
    oc_vocab = Vocabulary(eos, by_bytes)
    setup["outlines_core"] = {"version": md.version("outlines_core"), "vocabulary_s": time.perf_counter() - t0,
                              "vocabulary": "token bytes of safedecode's Vocabulary (SmolLM2's byte-level decoder)"}
    import xgrammar as xgr
    t0 = time.perf_counter()
    xgr_info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=V)
    setup["xgrammar"] = {"version": md.version("xgrammar"), "tokenizer_info_s": time.perf_counter() - t0,
                         "compiler": "GrammarCompiler(max_threads=1, cache_enabled=False)"}
    import llguidance as ll
    import llguidance.hf
    import llguidance.torch as llt
    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok)
    setup["llguidance"] = {"version": ll.__version__, "tokenizer_s": time.perf_counter() - t0}
    # Warm every apply kernel (torch.compile for outlines-core and llguidance) before any timing.
    from outlines_core.kernels.torch import allocate_token_bitmask as oc_alloc
    from outlines_core.kernels.torch import apply_token_bitmask_inplace as oc_apply
    t0 = time.perf_counter()
    for _ in range(3):
        oc_apply(torch.zeros((1, V)), oc_alloc(V))
        llt.apply_token_bitmask_inplace(torch.zeros((1, V)), llt.allocate_token_bitmask(1, V))
        xgr.apply_token_bitmask_inplace(torch.zeros((1, V)), xgr.allocate_token_bitmask(1, V))
    setup["apply_kernels_warmup_s"] = time.perf_counter() - t0
    log(f"set-up: {json.dumps(setup, default=str)}")
    # Reference: the floor of any apply that writes -inf over (almost) the whole row.
    scores, full = logits_row.clone(), torch.ones((1, V), dtype=torch.bool)
    fills, masked = [], []
    for _ in range(200):
        scores.copy_(logits_row)
        t0 = time.perf_counter_ns()
        scores.fill_(float("-inf"))
        t1 = time.perf_counter_ns()
        scores.copy_(logits_row)
        t2 = time.perf_counter_ns()
        scores.masked_fill_(full, float("-inf"))
        t3 = time.perf_counter_ns()
        fills.append(t1 - t0)
        masked.append(t3 - t2)
    results["reference"] = {"fill_neg_inf": summary(fills), "masked_fill_full_bool_mask": summary(masked)}
    negation = llguidance_negation(policy)

    schema_names = [s for s in args.schemas.split(",") if s]
    for name in schema_names:
        schema = SCHEMAS[name]
        doc = json.dumps(DOCUMENTS[name])
        tokens = tok.encode(doc, add_special_tokens=False)
        t0 = time.perf_counter()
        otype = output_type(schema)
        ot_s = time.perf_counter() - t0
        otype.parse(doc)  # the document is valid (jsonschema) and a word of the regex
        log(f"== {name}: {len(doc)} chars, {len(tokens)} tokens; document regex {len(otype.document):,} chars")
        for with_policy in (False, True):
            case = {"schema": name, "policy": args.policy if with_policy else None, "document": doc,
                    "tokens": len(tokens), "engines": {}}
            results["cases"].append(case)
            label = f"{name} {'+ ' + args.policy if with_policy else '(schema only)'}"
            makers = {}
            # safedecode
            sdp = otype.policy(policy if with_policy else None)
            compiles = []
            for _ in range(args.sd_compile_reps):
                harness.clear_memory_cache()
                gc.collect()
                t0 = time.perf_counter()
                compiled = safedecode.compile_policy(sdp, tok, cache_dir=False)
                compiles.append(time.perf_counter() - t0)
            harness.clear_memory_cache()
            st = {k: v for k, v in compiled.stats.items() if k != "component_rules"}
            case["engines"]["safedecode"] = {"compile_s": min(compiles), "compile_s_all": compiles,
                                             "output_type_s": ot_s, "stats": st, "rules": len(sdp.forbid)}
            makers["safedecode"] = safedecode_walker(compiled, prompt)
            log(f"  {label}: safedecode compile {min(compiles):.2f} s (all {[round(c, 2) for c in compiles]}), "
                f"DFA states {st.get('dfa_states')}, token states {st.get('token_states')}, "
                f"table {st.get('table_bytes', 0) / 1e6:.1f} MB")
            if not with_policy:
                # outlines-core
                times, index = [], None
                for _ in range(args.compile_reps):
                    gc.collect()
                    t0 = time.perf_counter()
                    index = Index(build_regex_from_schema(json.dumps(schema)), oc_vocab)
                    times.append(time.perf_counter() - t0)
                case["engines"]["outlines-core"] = {"compile_s": min(times), "compile_s_all": times}
                makers["outlines-core"] = outlines_walker(index, V)
                # xgrammar
                compiler = xgr.GrammarCompiler(xgr_info, max_threads=1, cache_enabled=False)
                times, xc = [], None
                for _ in range(args.compile_reps):
                    gc.collect()
                    t0 = time.perf_counter()
                    xc = compiler.compile_json_schema(json.dumps(schema))
                    times.append(time.perf_counter() - t0)
                case["engines"]["xgrammar"] = {"compile_s": min(times), "compile_s_all": times}
                makers["xgrammar"] = xgrammar_walker(xgr, xc, V)
                grammars = {"llguidance": ll.LLMatcher.grammar_from_json_schema(schema),
                            "llguidance-regex": "start: DOC\nDOC: " + lark_regex(otype.document) + "\n"}
            else:
                for peer in ("outlines-core", "xgrammar", "llguidance"):
                    case["engines"][peer] = {"not_expressible": NOT_EXPRESSIBLE[peer]}
                grammars = {"llguidance-regex": "start: DOC\nDOC: " + lark_regex(otype.document) + " & ~"
                            + lark_regex(negation) + "\n"}
            for peer, grammar in grammars.items():
                template, info = llguidance_build(ll, llt, lltok, grammar, tokens, logits_row, eos, LLG_LIMITS)
                creates = [info["compile_s"]] if info.get("compile_s") is not None else []
                if template is not None:
                    for _ in range(args.compile_reps - 1):  # more cold builds at the limits that worked
                        kw = dict(LLG_LIMITS)[info["limits"]]
                        gc.collect()
                        t0 = time.perf_counter()
                        m = ll.LLMatcher(lltok, grammar, log_level=0,
                                         limits=ll.LLParserLimits(**kw) if kw else None)
                        llt.fill_next_token_bitmask(m, llt.allocate_token_bitmask(1, V), 0)
                        creates.append(time.perf_counter() - t0)
                info["compile_s_all"] = creates
                info["compile_s"] = min(creates) if creates else None
                info["grammar_chars"] = len(grammar)
                case["engines"][peer] = info
                if template is not None:
                    makers[peer] = llguidance_walker(llt, template, V)
                else:
                    log(f"  {label}: {peer} FAILED: {info.get('error')}")
            # Timed walks (first one untimed in the stats).
            for engine, make in makers.items():
                entry = case["engines"][engine]
                t0 = time.perf_counter()
                _, problem = walk(make, tokens, logits_row, eos)
                entry["first_walk_ms"] = (time.perf_counter() - t0) * 1e3
                if entry.get("first_walk_s") is not None:  # llguidance: its build already walked once
                    entry["second_walk_ms"] = entry["first_walk_ms"]
                    entry["first_walk_ms"] = entry["first_walk_s"] * 1e3
                entry["first_walk_problem"] = problem
                reps, problems = [], []
                for _ in range(args.reps if problem is None else 0):
                    times, problem_r = walk(make, tokens, logits_row, eos)
                    if problem_r:
                        problems.append(problem_r)
                        break
                    reps.append(times)
                entry["accepts_document"] = problem is None and not problems
                entry["problem"] = problem or (problems[0] if problems else None)
                if reps:
                    entry["timing"] = stats_of(reps)
                    s = entry["timing"]["median_of_reps"]
                    log(f"  {label}: {engine:16s} p50 {fmt_us(s['p50_us'])} µs, p99 {fmt_us(s['p99_us'])} µs "
                        f"(first walk {entry['first_walk_ms']:.1f} ms)")
                else:
                    log(f"  {label}: {engine} REFUSED the document: {entry['problem']}")
            # Probes of this schema, on the same processors (untimed walks).
            for probe in probe_documents():
                if probe["schema"] != name:
                    continue
                ptext = json.dumps(probe["value"])
                ptoks = tok.encode(ptext, add_special_tokens=False)
                row = {"schema": name, "policy": case["policy"], "probe": probe["name"], "document": ptext,
                       "valid": probe["valid"], "secret": probe["secret"], "verdicts": {}}
                expect_accept = probe["valid"] and not (probe["secret"] and with_policy)
                for engine, make in makers.items():
                    _, problem = walk(make, ptoks, logits_row, eos)
                    row["verdicts"][engine] = {"accepted": problem is None, "where": problem,
                                               "as_expected": (problem is None) == expect_accept}
                row["expected"] = "accept" if expect_accept else "refuse"
                results["probes"].append(row)
            del makers
            gc.collect()

    # Keywords safedecode refuses that peers accept.
    for name, what, edit in REFUSED_VARIANTS:
        if name not in schema_names:
            continue
        schema = copy.deepcopy(SCHEMAS[name])
        edit(schema)
        row = {"schema": name, "keyword": what}
        try:
            output_type(schema)
            row["safedecode"] = "accepted"
        except OutputTypeError as exc:
            row["safedecode"] = f"refused: {str(exc)[:200]}"
        try:
            build_regex_from_schema(json.dumps(schema))
            row["outlines-core"] = "accepted (builds a regex; the keyword is ignored)"
        except Exception as exc:  # noqa: BLE001
            row["outlines-core"] = f"refused: {str(exc)[:160]}"
        try:
            xgr.GrammarCompiler(xgr_info, max_threads=1, cache_enabled=False).compile_json_schema(json.dumps(schema))
            row["xgrammar"] = "accepted"
        except Exception as exc:  # noqa: BLE001
            row["xgrammar"] = f"refused: {str(exc)[:160]}"
        m = ll.LLMatcher(lltok, ll.LLMatcher.grammar_from_json_schema(schema), log_level=0)
        row["llguidance"] = f"refused: {m.get_error()[:160]}" if m.is_error() else "accepted"
        results["refused_variants"].append(row)

    results["machine"]["loadavg_end"] = list(__import__("os").getloadavg())
    results["run_s"] = time.perf_counter() - t_run
    args.out.mkdir(parents=True, exist_ok=True)
    harness.write_json(args.out / "structured.json", results)
    report = render(results)
    harness.write_text(args.out / "structured.md", report)
    plot(results, args.out / "structured.png")
    print(report)
    log(f"done in {results['run_s']:.0f} s; wrote {args.out}/structured.{{md,json,png}}")
    refused = [(c["schema"], c["policy"], e) for c in results["cases"] for e, v in c["engines"].items()
               if "accepts_document" in v and not v["accepts_document"]]
    if refused:  # a probe that differs is a finding, reported in the tables; a refused walk is not measured
        log(f"engines that refused their walked document: {refused}")
    return 1 if refused else 0


# ------------------------------------------------------------------------------------ the report
def _engine_cell(entry: dict, key: str) -> str:
    t = entry.get("timing")
    if not t:
        return "—"
    return fmt_us(t[key[0]][key[1]])


def render(results: dict) -> str:
    m = results["machine"]
    lines = ["# Structured outputs: per-step mask cost and compile time", "",
             f"SmolLM2-135M-Instruct tokenizer (49,152 ids), CPU, B=1, float32 logits; torch 1 thread; "
             f"{m['cpu_model']}, {m['usable_cores']} usable cores; commit {m['git_commit']}; {m['date']}; "
             f"load average {m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end; "
             f"run {results['run_s']:.0f} s.", "",
             f"Per step = consume the token chosen last step + compute the mask + apply it to a (1, 49152) "
             f"row (random logits copied in outside the timer), one processor per walk. Each engine walks the "
             f"document's canonical tokens plus one final step (EOS must be allowed); "
             f"{results['cases'][0]['engines']['safedecode'].get('timing', {}).get('reps', '?')} timed walks "
             f"after one untimed one. **p50 / p99**: over the walk's steps of each step's *median* over the "
             f"walks; **min p50**: the same with each step's *minimum* over the walks (least disturbed by other "
             f"load on this shared 2-core machine). *first walk*: wall time of the first (untimed) walk "
             f"after compile, which pays lazy work (llguidance builds its lexer states as it goes). "
             f"**compile**: cold, no caches, best of the repetitions (all in the JSON); llguidance: "
             f"`LLMatcher` creation + first mask.", ""]
    lines += ["| schema | policy | engine | compile (s) | p50 µs | p99 µs | min p50 µs | first walk (ms) | accepts the walk | safedecode DFA / token states |",
              "|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    for case in results["cases"]:
        pol = case["policy"] or "none"
        for engine in ENGINES:
            e = case["engines"].get(engine)
            if e is None:
                continue
            sname = f"{case['schema']} ({case['tokens']} tok)"
            if "not_expressible" in e:
                lines.append(f"| {sname} | {pol} | {ENGINE_LABELS[engine]} | {e['not_expressible']} | | | | | | |")
                continue
            comp = e.get("compile_s")
            comp_s = "—" if comp is None else (f"{comp:.3f}" if comp < 10 else f"{comp:.1f}")
            if engine.startswith("llguidance") and e.get("limits") not in (None, "default"):
                comp_s += f" ({e['limits'].split(':')[0]} limits)"
            acc = "yes" if e.get("accepts_document") else f"**NO**: {e.get('problem') or e.get('error')}"
            states = ""
            if engine == "safedecode":
                states = f"{e['stats'].get('dfa_states')} / {e['stats'].get('token_states')}"
            lines.append(f"| {sname} | {pol} | {ENGINE_LABELS[engine]} | {comp_s} | "
                         f"{_engine_cell(e, ('median_of_reps', 'p50_us'))} | {_engine_cell(e, ('median_of_reps', 'p99_us'))} | "
                         f"{_engine_cell(e, ('min_of_reps', 'p50_us'))} | "
                         f"{e.get('first_walk_ms', 0):.1f} | {acc} | {states} |")
    ref = results["reference"]
    lines += ["", f"Reference, same row: `scores.fill_(-inf)` p50 {fmt_us(ref['fill_neg_inf']['p50_us'])} µs; "
              f"`scores.masked_fill_(mask, -inf)` with a full (1, 49152) bool mask p50 "
              f"{fmt_us(ref['masked_fill_full_bool_mask']['p50_us'])} µs (a JSON state allows few tokens, so "
              f"every engine writes -inf over almost the whole row each step)."]
    lines += ["", "safedecode tables (packed kernel tables, MB): " + ", ".join(
        f"{c['schema']}{' + ' + c['policy'] if c['policy'] else ''} {c['engines']['safedecode']['stats'].get('table_bytes', 0) / 1e6:.0f}"
        for c in results["cases"]) + "."]
    s = results["setup"]
    lines += ["", f"One-time set-up, not in the compile column: safedecode vocabulary extraction "
              f"{s['safedecode_vocabulary_s']:.2f} s and first use (numba kernels) {s['safedecode_first_use_s']:.2f} s; "
              f"outlines-core {s['outlines_core']['version']} `Vocabulary` {s['outlines_core']['vocabulary_s']:.2f} s "
              f"({s['outlines_core']['vocabulary']}); xgrammar {s['xgrammar']['version']} `TokenizerInfo` "
              f"{s['xgrammar']['tokenizer_info_s']:.2f} s, {s['xgrammar']['compiler']}; llguidance "
              f"{s['llguidance']['version']} `from_tokenizer` {s['llguidance']['tokenizer_s']:.2f} s."]
    lines += ["", "## Probes (whole walks, untimed)", "",
              "| schema | policy | probe | expected | " + " | ".join(ENGINE_LABELS[e] for e in ENGINES) + " |",
              "|---|---|---|---|" + "---|" * len(ENGINES)]
    for r in results["probes"]:
        cells = []
        for e in ENGINES:
            v = r["verdicts"].get(e)
            if v is None:
                cells.append("")
            else:
                mark = "accepts" if v["accepted"] else f"refuses ({(v['where'] or '').splitlines()[0][:110]})"
                cells.append(mark if v["as_expected"] else f"**{mark}**")
        lines.append(f"| {r['schema']} | {r['policy'] or 'none'} | {r['probe']} | {r['expected']} | " + " | ".join(cells) + " |")
    lines += ["", "A verdict in **bold** differs from the expected one (expected: every valid document accepted "
              "without a policy; with the policy, a document holding a secret refused)."]
    lines += ["", "## Keywords safedecode refuses", "",
              "| schema | keyword | safedecode | outlines-core | xgrammar | llguidance |", "|---|---|---|---|---|---|"]
    for r in results["refused_variants"]:
        lines.append(f"| {r['schema']} | {r['keyword']} | {r['safedecode']} | {r['outlines-core']} | "
                     f"{r['xgrammar']} | {r['llguidance']} |")
    lines += ["", "## Schemas", ""]
    for name, schema in SCHEMAS.items():
        lines += [f"**{SCHEMA_LABELS[name]}**", "", "```json", json.dumps(schema), "```", "",
                  "walked document:", "", "```json", json.dumps(DOCUMENTS[name]), "```", ""]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    plt = harness.pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.8))
    groups = [(c["schema"] + ("\n+ " + c["policy"] if c["policy"] else "\nschema only"), c) for c in results["cases"]]
    colors = {"safedecode": "tab:blue", "outlines-core": "tab:green", "xgrammar": "tab:purple",
              "llguidance": "tab:red", "llguidance-regex": "salmon"}
    width = 0.16
    for j, engine in enumerate(ENGINES):
        xs, ys = [], []
        for i, (_, c) in enumerate(groups):
            e = c["engines"].get(engine, {})
            if e.get("timing"):
                xs.append(i + (j - 2) * width)
                ys.append(e["timing"]["median_of_reps"]["p50_us"])
        if xs:
            ax.bar(xs, ys, width, label=ENGINE_LABELS[engine], color=colors[engine])
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([g for g, _ in groups], fontsize=8)
    ax.set_ylabel("p50 µs per step (B=1, 49k vocab)")
    ax.set_title("Per-step mask cost on a valid document's walk (missing bar: not expressible / refused)")
    ax.set_ylim(0, max([b.get_height() for b in ax.patches] + [1]) * 1.35)
    ax.legend(fontsize=7, ncol=3, loc="upper center")
    ax.grid(axis="y", alpha=0.3)
    harness.save_figure(fig, path, 120)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        sys.exit(2)
