#!/usr/bin/env python
"""How safedecode scales: policy size, vocabulary size, batch size, and end to end.

    .venv/bin/python benchmarks/scale.py            # full run (`make bench`), ~10-20 min
    .venv/bin/python benchmarks/scale.py --quick    # CI-sized run, a few minutes
    .venv/bin/python benchmarks/scale.py --out DIR  # where to write scale.{md,json,png}

safedecode only (the peer comparison is overhead.py's job); the workload, the simulated decoding
loop, the compile/cache measurement and the machine description are benchmarks/harness.py's, the
same as overhead.py's.

1. per-step time (p50/p99 µs) of ``SafeLogitsProcessor`` vs number of phrases (10 ... 10,000) on
   three vocabularies (SmolLM2 49,152; Qwen2.5 151,665; Qwen3.6 248,077) at B=1, and a batch sweep
   (1, 8, 32, 64) at 1,000 phrases (µs per call and per row); and regex-heavy policies (1,000
   phrases + overhead.py's 10 secret-like regexes, ``--regex-sizes``) on each vocabulary at B=1;
2. cold compile time, cached load time (disk cache, in-process cache cleared) and table size on
   the same axes; compiles are capped in time (``--compile-cap``) and a capped one is recorded;
3. end-to-end tokens/s of SmolLM2-135M greedy ``model.generate`` without a processor and with the
   full default policy (grammars/secrets.toml + shell.toml + profanity-wordlist.toml);
4. if xgrammar is installed: its ``any_text`` structural tag with ``excludes`` (a literal ban) for
   1,000 phrases on SmolLM2, compile time and per-step time, side by side;
5. per-step time vs context length: ``SafeLogitsProcessor`` on grammars/secrets.toml (SmolLM2) with
   prompts of L = 64 ... 32,768 tokens (``--context-lengths``) at B=1 and B=32 (``--context-batches``),
   plain rows (greedy/sampling) and beam-like rows (each step every row extends a row chosen by a
   seeded permutation of the previous rows). ``--context-only`` runs just this phase and writes
   context.{md,json,png} (it takes a minute or two).
"""
from __future__ import annotations

import argparse
import functools
import gc
import os
import sys
import tempfile
import time
import tomllib
import traceback
from pathlib import Path

import harness  # first: the offline environment, and the repository on sys.path

import numpy as np  # noqa: E402
import torch  # noqa: E402

import safedecode  # noqa: E402
from harness import (REGEXES, REPO, SEED, clear_memory_cache, fmt_us, log, make_phrases,  # noqa: E402
                     make_script, prompt_ids, run_stream, run_with_cap, safedecode_compile, summary,
                     vocabulary_words, xgrammar_build)

TARGETS = {"p50_us_large_vocab": 10.0, "us_per_row_b64": 2.0, "compile_s_10k_151k": 3.0,  # issue 14
           "table_mb_10k_151k": 64.0, "e2e_loss_pct": 1.0}
VOCABS = {"smollm2": "SmolLM2 (49k)", "qwen2.5": "Qwen2.5 (151k)", "qwen3.6": "Qwen3.6 (248k)"}
DEFAULT_POLICY_FILES = ["secrets.toml", "shell.toml", "profanity-wordlist.toml"]
E2E_PROMPTS = [
    "Write the release notes and the deployment checklist for the ops team.",
    "Explain how to rotate an API key without downtime.",
    "Summarise the plot of a heist movie in five sentences.",
    "Give me a bash one-liner that counts lines in every Python file of a project.",
    "Describe your ideal weekend in the mountains.",
]


def rss_mb() -> dict:
    """Current and peak resident memory of this process (MB), from /proc."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return {"rss_mb": out.get("VmRSS"), "peak_rss_mb": out.get("VmHWM")}


class TiktokenText:
    """The two methods of a HF tokenizer that harness.make_script / prompt_ids use, for tiktoken."""

    def __init__(self, enc):
        self.enc = enc

    def encode(self, text, add_special_tokens=False):
        return self.enc.encode(text, allowed_special="all")

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def load_vocab(name: str, smol_tok):
    """(object to compile against, text tokenizer for the script/prompt, logits width, eos ids)."""
    if name == "smollm2":
        return smol_tok, smol_tok, len(smol_tok), [smol_tok.eos_token_id]
    from safedecode.tokens.vocabulary import qwen_encoding, qwen_vocabulary

    version = name.removeprefix("qwen")
    vocab = qwen_vocabulary(version)
    return vocab, TiktokenText(qwen_encoding(version)), vocab.size, sorted(vocab.eos_ids)


def default_policy() -> safedecode.Policy:
    rules = []
    for fname in DEFAULT_POLICY_FILES:
        rules += tomllib.loads((REPO / "grammars" / fname).read_text(encoding="utf-8"))["forbid"]
    return safedecode.Policy(forbid=rules)


def warm_kernels(compile_on, prompt, V, batches) -> float:
    """A first compile, then every numba signature the runs use (per vocabulary width and batch
    size); seconds."""
    t0 = time.perf_counter()
    harness.warm_kernels(harness.tiny_policy_compiled(compile_on), prompt, V, batches)
    clear_memory_cache()
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------ phases
def policy_key(n: int, regexes: list[str]) -> str:
    """Key of a policy in the results: '1000' (phrases only) or '1000+R' (plus the 10 regexes)."""
    return f"{n}+R" if regexes else str(n)


def policy_label(key: str) -> str:
    """'1000+R' → '1,000+R' for the report."""
    n, plus, rest = key.partition("+")
    return f"{int(n):,}{plus}{rest}"


def bench_policy(args, vres, key, policy, compile_on, stream, tmp_root, batches) -> str | None:
    """Compile one policy (capped; cold, then cached loads) and time ``batches`` streams (``stream``:
    harness.run_stream with this vocabulary's prompt, script and logits bound) into
    ``vres["sizes"][key]`` (and ``vres["batch_sweep"]`` for the sweep policy). Returns the compile
    error, or None."""
    entry: dict = vres["sizes"][key]
    before = rss_mb()
    (out, err, _) = run_with_cap(lambda: safedecode_compile(policy, compile_on, tmp_root), args.compile_cap)
    entry["memory_before"], entry["memory_after"] = before, rss_mb()
    if err is not None:
        entry["compile_error"] = err
        log(f"  {key:>7}: compile FAILED/CAPPED: {err[:200]}")
        return err
    compiled, info = out
    entry["compile"] = info
    st = info["stats"]
    loads = info.get("cached_load_s") or []
    log(f"  {key:>7}: cold compile {info['cold_compile_s']:.2f} s, cached load "
        f"{(min(loads) * 1e3 if loads else float('nan')):.1f} ms, table "
        f"{st.get('table_bytes', 0) / 2**20:.1f} MB, {st.get('token_states')} token states; "
        f"peak RSS {entry['memory_after']['peak_rss_mb']:.0f} MB")
    for b in batches:
        run = stream(safedecode.SafeLogitsProcessor(compiled), batch=b, desc=f"{vres['name']} {key} B={b}")
        rec = {"batch": b, **harness.stream_record(run)}
        s = rec["summary"]
        if s.get("n"):
            rec["p50_us_per_row"] = s["p50_us"] / b
            rec["p99_us_per_row"] = s["p99_us"] / b
        if b == 1:
            entry["b1"] = rec
        if key == str(args.sweep_size):
            vres["batch_sweep"][str(b)] = rec
        log(f"      B={b:<3} p50 {fmt_us(s.get('p50_us'))} µs, p99 {fmt_us(s.get('p99_us'))} µs, "
            f"{fmt_us(s.get('p50_us', 0) / b)} µs/row, n={s.get('n')}, blocked {run['blocked_tokens']}"
            f"{harness.stream_status(run)}")
    return None


def bench_vocabularies(args, results, save, smol_tok, words, phrases_all, tmp_root):
    """Per vocabulary: the phrase-only policies (``--sizes``), then the regex-heavy ones
    (``--regex-sizes`` phrases + harness.REGEXES); the batch sweep at ``--sweep-size`` phrases."""
    policies = [(n, []) for n in args.sizes] + [(n, REGEXES) for n in args.regex_sizes]
    for vname in args.vocabs:
        log(f"=== vocabulary {vname}")
        t0 = time.perf_counter()
        compile_on, text_tok, V, eos = load_vocab(vname, smol_tok)
        vres = {"name": VOCABS.get(vname, vname), "logits_width": V, "load_s": time.perf_counter() - t0,
                "sizes": {}, "batch_sweep": {}}
        results["vocabs"][vname] = vres
        script = make_script(text_tok, words, phrases_all[:args.sweep_size], 4000, args.seed)
        prompt = prompt_ids(text_tok)
        bases = harness.random_logits(2, max(args.batches), V, eos, args.seed)
        vres["kernel_warmup_s"] = warm_kernels(compile_on, prompt, V, sorted(set(args.batches) | {1}))
        log(f"{vres['name']}: logits width {V:,}, load {vres['load_s']:.1f} s, kernel warm-up "
            f"{vres['kernel_warmup_s']:.1f} s, script {len(script)} tokens")

        stream = functools.partial(run_stream, prompt=prompt, script=script, bases=bases, warmup=args.warmup,
                                   steps=args.steps, cap_s=args.cap)
        stop_larger = {False: None, True: None}  # a capped compile skips the larger policies of its kind
        for n, regexes in policies:
            key = policy_key(n, regexes)
            vres["sizes"][key] = {"phrases": n, "regexes": len(regexes)}
            if stop_larger[bool(regexes)]:
                vres["sizes"][key]["skipped"] = stop_larger[bool(regexes)]
                log(f"  {key:>7}: skipped ({stop_larger[bool(regexes)]})")
                continue
            policy = safedecode.Policy(forbid=[{"literal": p} for p in phrases_all[:n]] +
                                       [{"regex": r} for r in regexes])
            batches = [1] + ([b for b in args.batches if b != 1] if key == str(args.sweep_size) else [])
            err = bench_policy(args, vres, key, policy, compile_on, stream, tmp_root, batches)
            if err is not None:
                stop_larger[bool(regexes)] = f"{policy_label(key)}: {err[:160]}"
            gc.collect()
            save()
        stream = bases = None  # free the logits before the next vocabulary's
        gc.collect()


def bench_end_to_end(args, results, save):
    from safedecode.models import load_default_model

    log("=== end to end: SmolLM2-135M greedy generate")
    model, tok = load_default_model()
    policy = default_policy()
    clear_memory_cache()
    t0 = time.perf_counter()
    compiled = safedecode.compile_policy(policy, tok, cache_dir=False)
    e2e = {"policy_files": DEFAULT_POLICY_FILES, "rules": len(policy.forbid),
           "compile_s": time.perf_counter() - t0,
           "stats": {k: v for k, v in compiled.stats.items() if k != "component_rules"},
           "prompts": E2E_PROMPTS[:args.e2e_prompts], "max_new_tokens": args.e2e_tokens, "rounds": args.e2e_rounds}
    results["end_to_end"] = e2e
    log(f"full default policy: {e2e['rules']} rules, compile {e2e['compile_s']:.1f} s, table "
        f"{e2e['stats'].get('table_bytes', 0) / 2**20:.1f} MB")
    inputs = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True) for p in e2e["prompts"]]

    from transformers import LogitsProcessor, LogitsProcessorList

    class TimedProcessor(LogitsProcessor):
        """Times each call of the wrapped processor inside generate (a direct, low-noise measure)."""

        def __init__(self, inner):
            self.inner, self.ns = inner, []

        def __call__(self, input_ids, scores):
            t0 = time.perf_counter_ns()
            out = self.inner(input_ids, scores)
            self.ns.append(time.perf_counter_ns() - t0)
            return out

    proc_ns: list[int] = []
    proc_share: list[float] = []

    def gen(enc, with_proc):
        kwargs = dict(max_new_tokens=args.e2e_tokens, min_new_tokens=args.e2e_tokens, do_sample=False,
                      pad_token_id=tok.pad_token_id)
        timed = None
        if with_proc:
            timed = TimedProcessor(safedecode.SafeLogitsProcessor(compiled))
            kwargs["logits_processor"] = LogitsProcessorList([timed])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, **kwargs)
        seconds = time.perf_counter() - t0
        if timed is not None:
            proc_ns.extend(timed.ns)
            proc_share.append(sum(timed.ns) / 1e9 / seconds)
        return seconds, out.shape[1] - enc["input_ids"].shape[1]

    gen(inputs[0], False)  # warm-up: torch kernels, numba signatures
    gen(inputs[0], True)
    proc_ns.clear()
    proc_share.clear()
    # Interleaved (none, safedecode) per prompt and round, so drift in machine load hits both alike.
    times = {"none": [[] for _ in inputs], "safedecode": [[] for _ in inputs]}
    tokens = {"none": [0] * len(inputs), "safedecode": [0] * len(inputs)}
    for r in range(args.e2e_rounds):
        for i, enc in enumerate(inputs):
            order = ("none", "safedecode") if (r + i) % 2 == 0 else ("safedecode", "none")
            for mode in order:
                s, n = gen(enc, mode == "safedecode")
                times[mode][i].append(s)
                tokens[mode][i] = n
        log(f"  round {r + 1}/{args.e2e_rounds}: none {sum(t[-1] for t in times['none']):.2f} s, "
            f"safedecode {sum(t[-1] for t in times['safedecode']):.2f} s")
    for mode in times:
        best = sum(min(t) for t in times[mode])   # per prompt, the fastest round
        median = sum(float(np.median(t)) for t in times[mode])
        e2e[mode] = {"seconds_per_prompt_round": times[mode], "tokens_per_prompt": tokens[mode],
                     "tokens": sum(tokens[mode]), "best_s": best, "median_s": median,
                     "tokens_per_s_best": sum(tokens[mode]) / best, "tokens_per_s_median": sum(tokens[mode]) / median}
    e2e["processor_in_generate"] = {"calls": len(proc_ns), **summary(proc_ns),
                                    "share_of_generate_pct_median": float(np.median(proc_share)) * 100 if proc_share else None,
                                    "share_of_generate_pct_max": float(np.max(proc_share)) * 100 if proc_share else None}
    for stat in ("best", "median"):
        a, b = e2e["none"][f"tokens_per_s_{stat}"], e2e["safedecode"][f"tokens_per_s_{stat}"]
        e2e[f"loss_pct_{stat}"] = (a - b) / a * 100
    pg = e2e["processor_in_generate"]
    log(f"  SafeLogitsProcessor inside generate: {pg['calls']} calls, p50 {fmt_us(pg.get('p50_us'))} µs, "
        f"p99 {fmt_us(pg.get('p99_us'))} µs, {pg['share_of_generate_pct_median']:.3f} % of generate's wall time (median)")
    log(f"  tokens/s (best of rounds): none {e2e['none']['tokens_per_s_best']:.1f}, safedecode "
        f"{e2e['safedecode']['tokens_per_s_best']:.1f} → loss {e2e['loss_pct_best']:.2f} % "
        f"(median: {e2e['loss_pct_median']:.2f} %)")
    save()


def bench_xgrammar(args, results, save, smol_tok, words, phrases_all, tmp_root):
    log("=== xgrammar side by side (SmolLM2, literal ban)")
    xres: dict = {}
    results["xgrammar"] = xres
    n = args.xgrammar_size
    phrases = phrases_all[:n]
    V = len(smol_tok)
    script = make_script(smol_tok, words, phrases_all[:args.sweep_size], 4000, args.seed)
    prompt = prompt_ids(smol_tok)
    bases = harness.random_logits(2, 1, V, [smol_tok.eos_token_id], args.seed)

    def stream(proc, desc):
        run = run_stream(proc, batch=1, prompt=prompt, script=script, bases=bases, warmup=args.warmup,
                         steps=args.steps, cap_s=args.cap, desc=desc)
        return {"summary": summary(run["calls_ns"]), "blocked_tokens": run["blocked_tokens"],
                "error": run["error"], "capped": run["capped"]}

    policy = safedecode.Policy(forbid=[{"literal": p} for p in phrases])
    compiled, info = safedecode_compile(policy, smol_tok, tmp_root)
    xres["safedecode"] = {"cold_compile_s": info["cold_compile_s"], "table_bytes": info["stats"].get("table_bytes"),
                          **stream(safedecode.SafeLogitsProcessor(compiled), "safedecode")}
    log(f"xgrammar: compiling the structural tag for {n} phrases (cap {args.xgrammar_cap:.0f} s) ...")
    make, info = xgrammar_build(smol_tok, phrases, args.xgrammar_cap)
    xres.update(info)
    if make is None:
        log(f"xgrammar: {info.get('skipped') or info.get('error')}")
        save()
        return
    log(f"xgrammar {info['version']} compile {info['compile_s']:.1f} s")
    xres.update(stream(make(), "xgrammar"))
    s, sd = xres["summary"], xres["safedecode"]["summary"]
    log(f"xgrammar p50 {fmt_us(s.get('p50_us'))} µs, p99 {fmt_us(s.get('p99_us'))} µs, blocked {xres['blocked_tokens']}"
        f" | safedecode p50 {fmt_us(sd.get('p50_us'))} µs, blocked {xres['safedecode']['blocked_tokens']}")
    save()


# ------------------------------------------------------------------------------------ context length
CONTEXT_POLICY = "secrets"  # grammars/secrets.toml


def run_beam_stream(proc, *, batch, prompt, script, bases, warmup, steps, seed):
    """Like harness.run_stream, but beam-like: after each call every row extends a row of the previous
    call drawn at random with replacement (beam search keeps some beams twice and drops others), by
    the script's next token if the processor left it allowed, else by its argmax. Returns timings."""
    rng = np.random.default_rng(seed)
    ids = torch.tensor([prompt] * batch, dtype=torch.long)
    scores = torch.empty((batch, bases.shape[-1]), dtype=bases.dtype)
    calls, blocked = [], 0
    gc.collect()
    gc.disable()
    try:
        for step in range(warmup + steps):
            scores.copy_(bases[step % bases.shape[0], :batch])
            t0 = time.perf_counter_ns()
            out = proc(ids, scores)
            t1 = time.perf_counter_ns()
            if step >= warmup:
                calls.append(t1 - t0)
            parents = torch.from_numpy(np.sort(rng.integers(0, batch, batch)))
            want = torch.tensor([script[(r * 97 + step) % len(script)] for r in range(batch)])
            ok = torch.isfinite(out[parents].gather(1, want[:, None]).squeeze(1))
            blocked += int((~ok).sum())
            nxt = torch.where(ok, want, out[parents].argmax(-1))
            ids = torch.cat([ids[parents], nxt[:, None]], dim=1)
    finally:
        gc.enable()
    return {"calls_ns": calls, "blocked_tokens": blocked}


def bench_context(args, results, save, smol_tok, words, phrases_all) -> None:
    """Per-step time of SafeLogitsProcessor on grammars/secrets.toml vs the context length L (the
    prompt's length: every call passes the whole (B, L + step) ``input_ids``), at each batch size,
    plain and beam-like (B > 1)."""
    log(f"=== context length: {args.context_lengths} × B {args.context_batches}, policy grammars/{CONTEXT_POLICY}.toml")
    compiled = safedecode.compile_policy(safedecode.load_policy(CONTEXT_POLICY), smol_tok)
    V = len(smol_tok)
    script = make_script(smol_tok, words, phrases_all[:args.sweep_size], 4000, args.seed)
    head = prompt_ids(smol_tok)
    filler = make_script(smol_tok, words, phrases_all[:args.sweep_size], 4000, args.seed + 7)
    bases = harness.random_logits(2, max(args.context_batches), V, [smol_tok.eos_token_id], args.seed)
    harness.warm_kernels(compiled, head, V, sorted(set(args.context_batches)))
    cres = {"policy": f"grammars/{CONTEXT_POLICY}.toml", "vocabulary": VOCABS["smollm2"], "logits_width": V,
            "steps": args.context_steps, "warmup": args.context_warmup, "runs": []}
    results["context"] = cres
    for L in args.context_lengths:
        body = (filler * (L // len(filler) + 1))[:max(0, L - len(head))]
        prompt = (body + head)[-L:]  # a long document, then the chat prompt; exactly L ids
        for b in args.context_batches:
            for mode in (("plain", "beam") if b > 1 else ("plain",)):
                proc = safedecode.SafeLogitsProcessor(compiled)
                if mode == "plain":
                    run = run_stream(proc, batch=b, prompt=prompt, script=script, bases=bases, warmup=args.context_warmup,
                                     steps=args.context_steps, cap_s=args.cap, desc=f"L={L} B={b}")
                else:
                    run = run_beam_stream(proc, batch=b, prompt=prompt, script=script, bases=bases,
                                          warmup=args.context_warmup, steps=args.context_steps, seed=args.seed + L)
                s = summary(run["calls_ns"])
                cres["runs"].append({"L": L, "batch": b, "mode": mode, "summary": s,
                                     "blocked_tokens": run["blocked_tokens"], "error": run.get("error"),
                                     "capped": run.get("capped", False),
                                     "calls_us": [round(x / 1e3, 3) for x in run["calls_ns"]]})
                log(f"  L={L:>6,} B={b:<3} {mode:<5} p50 {fmt_us(s.get('p50_us'))} µs, p99 {fmt_us(s.get('p99_us'))} µs, "
                    f"n={s.get('n')}, blocked {run['blocked_tokens']}"
                    f"{harness.stream_status(run) if 'capped' in run else ''}")
                save()
                gc.collect()


def render_context(results) -> str:
    c = results.get("context") or {}
    if not c.get("runs"):
        return "Not run." if not c.get("error") else f"Not completed: {c['error']}"
    L = [f"`SafeLogitsProcessor` on {c['policy']} ({c['vocabulary']}, float32 CPU logits), per call, after a prompt "
         f"of L ids; {c['steps']} timed steps after {c['warmup']} untimed ones (the first call of a generation, "
         "which reads the whole prompt once, is among the untimed ones). *plain*: rows keep their order "
         "(greedy, sampling); *beam*: each step every row extends a row of the previous call drawn at random "
         "with replacement (beam search).", "",
         "| L | B | rows | p50 µs/call | p99 µs/call | p50 µs/row | blocked |", "|---:|---:|---|---:|---:|---:|---:|"]
    for r in c["runs"]:
        s = r["summary"]
        flag = " ERROR" if r.get("error") else (" (capped)" if r.get("capped") else "")
        L.append(f"| {r['L']:,} | {r['batch']} | {r['mode']} | {fmt_us(s.get('p50_us'))}{flag} | {fmt_us(s.get('p99_us'))} | "
                 f"{fmt_us(s.get('p50_us', 0) / r['batch']) if s.get('n') else '—'} | {r['blocked_tokens']} |")
    return "\n".join(L)


def plot_context(results, path: Path) -> None:
    plt = harness.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6))
    runs = (results.get("context") or {}).get("runs", [])
    series: dict = {}
    for r in runs:
        if r["summary"].get("n"):
            series.setdefault((r["batch"], r["mode"]), []).append((r["L"], r["summary"]["p50_us"], r["summary"]["p99_us"]))
    for k, ((b, mode), pts) in enumerate(sorted(series.items())):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color=f"C{k}", label=f"B={b} {mode} p50")
        ax.plot([p[0] for p in pts], [p[2] for p in pts], ":", color=f"C{k}", alpha=0.6, label=f"B={b} {mode} p99")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length L (ids in input_ids)")
    ax.set_ylabel("µs per call")
    ax.set_title(f"SafeLogitsProcessor per call vs context length ({(results.get('context') or {}).get('policy')})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    harness.save_figure(fig, path, dpi=130)


# ------------------------------------------------------------------------------------ report
def evaluate_targets(results) -> list[dict]:
    out = []
    vocabs = results.get("vocabs", {})
    sweep = str(results["config"]["sweep_size"])
    for key in (sweep, sweep + "+R"):
        for v in ("qwen2.5", "qwen3.6"):
            e = vocabs.get(v, {}).get("sizes", {}).get(key)
            if e is None and key != sweep:  # regex-heavy policies not run: no row
                continue
            e = e or {}
            r = e.get("b1")
            val = r["summary"].get("p50_us") if r and not r.get("error") else None
            what = f"{policy_label(sweep)} phrases" + (" + 10 regexes" if key != sweep else "")
            out.append({"target": f"p50 ≤ {TARGETS['p50_us_large_vocab']:g} µs/step, {what}, B=1",
                        "where": VOCABS[v], "value": val, "unit": "µs",
                        "why_not_measured": e.get("compile_error") or e.get("skipped"),
                        "met": None if val is None else val <= TARGETS["p50_us_large_vocab"]})
    for v in results["config"]["vocabs"]:
        r = vocabs.get(v, {}).get("batch_sweep", {}).get("64")
        val = r.get("p50_us_per_row") if r and not r.get("error") else None
        out.append({"target": f"≤ {TARGETS['us_per_row_b64']:g} µs per row at B=64 (p50, {int(sweep):,} phrases)",
                    "where": VOCABS.get(v, v), "value": val, "unit": "µs/row",
                    "met": None if val is None else val <= TARGETS["us_per_row_b64"]})
    e = vocabs.get("qwen2.5", {}).get("sizes", {}).get("10000", {})
    c = e.get("compile")
    cold = c["cold_compile_s"] if c else None
    mb = c["stats"].get("table_bytes", 0) / 1e6 if c else None
    why = e.get("compile_error") or e.get("skipped")
    out.append({"target": f"cold compile ≤ {TARGETS['compile_s_10k_151k']:g} s, 10,000 phrases", "where": VOCABS["qwen2.5"],
                "value": cold, "unit": "s", "why_not_measured": why,
                "met": None if cold is None else cold <= TARGETS["compile_s_10k_151k"]})
    out.append({"target": f"table ≤ {TARGETS['table_mb_10k_151k']:g} MB, 10,000 phrases", "where": VOCABS["qwen2.5"],
                "value": mb, "unit": "MB", "why_not_measured": why,
                "met": None if mb is None else mb <= TARGETS["table_mb_10k_151k"]})
    e2e = results.get("end_to_end") or {}
    loss = e2e.get("loss_pct_best")
    out.append({"target": f"end-to-end tokens/s loss ≤ {TARGETS['e2e_loss_pct']:g} %", "where": "SmolLM2-135M, full default policy",
                "value": loss, "unit": "%", "met": None if loss is None else loss <= TARGETS["e2e_loss_pct"]})
    share = (e2e.get("processor_in_generate") or {}).get("share_of_generate_pct_median")
    out.append({"target": f"same, direct measure: processor time ≤ {TARGETS['e2e_loss_pct']:g} % of generate's time",
                "where": "SmolLM2-135M, full default policy", "value": share, "unit": "%",
                "met": None if share is None else share <= TARGETS["e2e_loss_pct"]})
    return out


def render_markdown(results) -> str:
    cfg, m = results["config"], results["machine"]
    L = ["# safedecode scaling benchmark", "",
         f"Generated by `benchmarks/scale.py{' --quick' if cfg['quick'] else ''}` on {m['date']}; "
         f"{cfg['steps']} timed steps after {cfg['warmup']} warm-up steps per configuration; per-configuration cap "
         f"{cfg['cap_s']:.0f} s, compile cap {cfg['compile_cap_s']:.0f} s; total run {results.get('total_s', 0):.0f} s. "
         "Every number is wall-clock time on a shared machine; see benchmarks/README.md.", ""]
    L += ["## Targets", "", "| target | where | measured | met |", "|---|---|---|---|"]
    for t in results.get("targets", []):
        v = t["value"]
        shown = "not measured" + (f" ({t['why_not_measured'][:120]})" if t.get("why_not_measured") else "") if v is None \
            else f"{v:,.2f} {t['unit']}"
        met = "—" if t["met"] is None else ("**yes**" if t["met"] else "**no**")
        L.append(f"| {t['target']} | {t['where']} | {shown} | {met} |")
    L += ["", "## Per-step time, compile, cache and table size vs policy size (B=1)", "",
          ("Policy *N*: the first *N* seeded phrases; *N*+R: the same plus overhead.py's 10 secret-like "
           "regexes (regex-heavy)."), "",
          "| vocabulary | policy | p50 µs | p99 µs | blocked | cold compile s | cached load ms | table MB | "
          "token states | peak RSS MB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v, vres in results.get("vocabs", {}).items():
        for n, e in vres["sizes"].items():
            if "skipped" in e or "compile_error" in e:
                L.append(f"| {vres['name']} | {policy_label(n)} | — | — | — | "
                         f"{'capped/failed' if 'compile_error' in e else 'skipped'}: {(e.get('compile_error') or e.get('skipped'))[:100]} | — | — | — | "
                         f"{(e.get('memory_after') or {}).get('peak_rss_mb') or 0:.0f} |")
                continue
            c, b1 = e["compile"], e.get("b1") or {}
            s = b1.get("summary", {})
            loads = c.get("cached_load_s") or []
            flag = " (capped)" if b1.get("capped") else (" ERROR" if b1.get("error") else "")
            L.append(f"| {vres['name']} | {policy_label(n)} | {fmt_us(s.get('p50_us'))}{flag} | {fmt_us(s.get('p99_us'))} | "
                     f"{b1.get('blocked_tokens', '—')} | {c['cold_compile_s']:.2f} | "
                     f"{(min(loads) * 1e3 if loads else float('nan')):.1f} | {c['stats'].get('table_bytes', 0) / 1e6:.2f} | "
                     f"{c['stats'].get('token_states', '—')} | {e['memory_after']['peak_rss_mb']:.0f} |")
    L += ["", "*peak RSS*: the process's high-water mark after the compile (monotonic: it only shows a compile "
          "that needed more memory than anything before it). Table MB = `stats['table_bytes']` / 10⁶.", ""]
    L += [f"## Batch sweep at {cfg['sweep_size']:,} phrases", "",
          "| vocabulary | B | p50 µs/call | p99 µs/call | p50 µs/row | p99 µs/row | blocked | logits copy p50 µs (reference) |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for v, vres in results.get("vocabs", {}).items():
        for b, r in vres["batch_sweep"].items():
            s = r["summary"]
            L.append(f"| {vres['name']} | {b} | {fmt_us(s.get('p50_us'))} | {fmt_us(s.get('p99_us'))} | "
                     f"{fmt_us(r.get('p50_us_per_row'))} | {fmt_us(r.get('p99_us_per_row'))} | {r['blocked_tokens']} | "
                     f"{fmt_us(r['copy_summary'].get('p50_us'))} |")
    e2e = results.get("end_to_end")
    L += ["", "## End to end: SmolLM2-135M greedy `model.generate`", ""]
    if e2e and "none" in e2e:
        L += [f"{len(e2e['prompts'])} chat prompts × {e2e['max_new_tokens']} new tokens (min = max new tokens), "
              f"{e2e['rounds']} interleaved rounds, torch with {m['torch_threads']} thread(s). Policy: the union of "
              f"{', '.join('grammars/' + f for f in e2e['policy_files'])} ({e2e['rules']} rules; compile "
              f"{e2e['compile_s']:.1f} s, {e2e['stats'].get('token_states')} token states, table "
              f"{e2e['stats'].get('table_bytes', 0) / 1e6:.1f} MB).", "",
              "| processor | tokens | seconds (best round per prompt) | tokens/s (best) | tokens/s (median) |",
              "|---|---:|---:|---:|---:|"]
        for mode in ("none", "safedecode"):
            r = e2e[mode]
            L.append(f"| {mode} | {r['tokens']} | {r['best_s']:.2f} | {r['tokens_per_s_best']:.1f} | {r['tokens_per_s_median']:.1f} |")
        L += ["", f"Loss: **{e2e['loss_pct_best']:.2f} %** (best rounds), {e2e['loss_pct_median']:.2f} % (medians). "
              "Differences of a few % between whole `generate` runs are within run-to-run noise on a shared 2-core machine."]
        pg = e2e.get("processor_in_generate")
        if pg and pg.get("n"):
            L += ["", f"Direct measure (less noisy): the `SafeLogitsProcessor` calls themselves, timed inside `generate`: "
                  f"{pg['calls']} calls, p50 {fmt_us(pg['p50_us'])} µs, p99 {fmt_us(pg['p99_us'])} µs, mean "
                  f"{fmt_us(pg['mean_us'])} µs per call = **{pg['share_of_generate_pct_median']:.3f} %** of `generate`'s "
                  f"wall time (median over prompts × rounds; max {pg['share_of_generate_pct_max']:.3f} %)."]
    elif e2e:
        L.append(f"Not completed: {e2e.get('error', 'skipped')}")
    else:
        L.append("Not run.")
    x = results.get("xgrammar")
    L += ["", "## xgrammar side by side (SmolLM2, literal ban, B=1)", ""]
    if not x:
        L.append("Not run.")
    elif x.get("skipped"):
        L.append(f"Skipped: {x['skipped']}")
    else:
        L += [f"xgrammar {x.get('version')}: {x.get('grammar')}; {x.get('phrases'):,} phrases. Processor: accept the "
              "last token, `fill_next_token_bitmask`, `apply_token_bitmask_inplace` (CPU).", "",
              "| engine | compile s | p50 µs | p99 µs | blocked |", "|---|---:|---:|---:|---:|"]
        sd = x.get("safedecode", {})
        L.append(f"| safedecode | {sd.get('cold_compile_s', float('nan')):.2f} | {fmt_us(sd.get('summary', {}).get('p50_us'))} | "
                 f"{fmt_us(sd.get('summary', {}).get('p99_us'))} | {sd.get('blocked_tokens', '—')} |")
        if x.get("error"):
            L.append(f"| xgrammar | {x['error'][:120]} | — | — | — |")
        else:
            s = x.get("summary", {})
            L.append(f"| xgrammar | {x['compile_s']:.2f} | {fmt_us(s.get('p50_us'))} | {fmt_us(s.get('p99_us'))} | "
                     f"{x.get('blocked_tokens', '—')}{' ERROR ' + x['error'][:80] if x.get('error') else ''} |")
    L += ["", "## Per-step time vs context length", "", render_context(results)]
    L += ["", "## Machine", "", f"* CPU: {m['cpu_model']} ({m['usable_cores']} usable of {m['logical_cores']} logical cores)",
          f"* {m['platform']}; torch threads: {m['torch_threads']}; git commit {m.get('git_commit')}",
          f"* versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}",
          f"* load average at start {m['loadavg_start']}, at end {results.get('loadavg_end')}", ""]
    return "\n".join(L)


def plot(results, path: Path) -> None:
    plt = harness.pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors: dict = {}
    for v, vres in results.get("vocabs", {}).items():
        for regex_heavy, style in ((False, "-o"), (True, "s")):
            done = {k: e for k, e in vres["sizes"].items() if e.get("b1", {}).get("summary", {}).get("n")
                    and k.endswith("+R") == regex_heavy}
            if done:
                a1.plot([e["phrases"] for e in done.values()], [e["b1"]["summary"]["p50_us"] for e in done.values()],
                        style, label=vres["name"] + (" + 10 regexes" if regex_heavy else ""),
                        color=colors.setdefault(v, f"C{len(colors)}"))
        bs = [int(b) for b, r in vres["batch_sweep"].items() if r.get("p50_us_per_row") is not None]
        if bs:
            a2.plot(bs, [vres["batch_sweep"][str(b)]["p50_us_per_row"] for b in bs], "-o", label=vres["name"],
                    color=colors.setdefault(v, f"C{len(colors)}"))
    a1.axhline(TARGETS["p50_us_large_vocab"], color="0.5", linestyle=":", label="target (151k/248k)")
    a2.axhline(TARGETS["us_per_row_b64"], color="0.5", linestyle=":", label="target at B=64")
    for ax, xl, yl, title in ((a1, "forbidden phrases", "p50 µs per step", "B=1"),
                              (a2, "batch size", "p50 µs per row", f"{results['config']['sweep_size']:,} phrases")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"safedecode SafeLogitsProcessor scaling ({results['machine']['cpu_model']})", fontsize=9)
    harness.save_figure(fig, path, dpi=130)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI-sized run")
    ap.add_argument("--out", default=str(harness.RESULTS))
    ap.add_argument("--steps", type=int, help="timed steps per configuration (default 300, quick 60)")
    ap.add_argument("--warmup", type=int, help="untimed warm-up steps (default 30, quick 10)")
    ap.add_argument("--sizes", help="phrase counts (default 10,100,1000,10000; quick 10,100,1000)")
    ap.add_argument("--batches", help="batch sweep (default 1,8,32,64; quick 1,64)")
    ap.add_argument("--sweep-size", type=int, default=1000, help="phrases for the batch sweep (default 1000)")
    ap.add_argument("--regex-sizes", default="1000", help="phrase counts of the regex-heavy policies: those "
                    "phrases + overhead.py's 10 secret-like regexes, on each vocabulary at B=1 (default 1000; '' skips)")
    ap.add_argument("--vocabs", default="smollm2,qwen2.5,qwen3.6")
    ap.add_argument("--cap", type=float, help="seconds per timed stream before it is cut short (default 60, quick 20)")
    ap.add_argument("--compile-cap", type=float, help="seconds per compile before it is abandoned and larger "
                    "sizes on that vocabulary are skipped (default 240, quick 60)")
    ap.add_argument("--e2e-prompts", type=int, help="prompts for the end-to-end run (default 5, quick 2)")
    ap.add_argument("--e2e-tokens", type=int, help="new tokens per prompt (default 64, quick 32)")
    ap.add_argument("--e2e-rounds", type=int, help="interleaved rounds (default 3, quick 1)")
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--no-xgrammar", action="store_true")
    ap.add_argument("--xgrammar-size", type=int, help="phrases for xgrammar (default 1000, quick 100)")
    ap.add_argument("--xgrammar-cap", type=float, help="seconds for xgrammar's compile (default 180, quick 60)")
    ap.add_argument("--context-lengths", default="64,256,1024,2048,8192,32768",
                    help="prompt lengths of the context-length sweep ('' skips it)")
    ap.add_argument("--context-batches", default="1,32", help="batch sizes of the context-length sweep")
    ap.add_argument("--context-steps", type=int, help="timed steps per context configuration (default 200, quick 60)")
    ap.add_argument("--context-warmup", type=int, help="untimed steps per context configuration (default 20, quick 5)")
    ap.add_argument("--context-only", action="store_true",
                    help="run only the context-length sweep; write context.{md,json,png}")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)
    q = args.quick
    args.steps = args.steps or (60 if q else 300)
    args.warmup = args.warmup if args.warmup is not None else (10 if q else 30)
    args.sizes = [int(s) for s in (args.sizes or ("10,100,1000" if q else "10,100,1000,10000")).split(",") if s]
    args.batches = [int(b) for b in (args.batches or ("1,64" if q else "1,8,32,64")).split(",") if b]
    args.regex_sizes = [int(s) for s in args.regex_sizes.split(",") if s]
    args.vocabs = [v for v in args.vocabs.split(",") if v]
    args.cap = args.cap or (20.0 if q else 60.0)
    args.compile_cap = args.compile_cap or (60.0 if q else 240.0)
    args.e2e_prompts = args.e2e_prompts or (2 if q else 5)
    args.e2e_tokens = args.e2e_tokens or (32 if q else 64)
    args.e2e_rounds = args.e2e_rounds or (1 if q else 3)
    args.xgrammar_size = args.xgrammar_size or (100 if q else 1000)
    args.xgrammar_cap = args.xgrammar_cap or (60.0 if q else 180.0)
    args.context_lengths = [int(x) for x in args.context_lengths.split(",") if x]
    args.context_batches = [int(x) for x in args.context_batches.split(",") if x]
    args.context_steps = args.context_steps or (60 if q else 200)
    args.context_warmup = args.context_warmup if args.context_warmup is not None else (5 if q else 20)
    unknown = set(args.vocabs) - set(VOCABS)
    if unknown:
        ap.error(f"unknown vocabularies {sorted(unknown)}; choose from {list(VOCABS)}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(args.seed)
    t_run = time.perf_counter()
    results: dict = {"config": {"quick": q, "steps": args.steps, "warmup": args.warmup, "sizes": args.sizes,
                                "batches": args.batches, "sweep_size": args.sweep_size, "vocabs": args.vocabs,
                                "regex_sizes": args.regex_sizes, "regexes": REGEXES,
                                "cap_s": args.cap, "compile_cap_s": args.compile_cap, "seed": args.seed,
                                "context_lengths": args.context_lengths, "context_batches": args.context_batches,
                                "targets": TARGETS},
                     "machine": harness.machine_info(args.torch_threads), "vocabs": {}}
    results["machine"]["versions"]["xgrammar"] = harness.xgrammar_version()

    def save():
        harness.write_json(out_dir / "scale.json", results)

    from safedecode.models import load_default_tokenizer

    smol_tok = load_default_tokenizer()
    words = vocabulary_words(smol_tok)
    phrases_all = make_phrases(words, max(args.sizes + args.regex_sizes + [args.sweep_size, args.xgrammar_size]),
                               args.seed)
    results["workload"] = {"words_in_pool": len(words), "phrases_head": phrases_all[:20]}
    log(f"{len(words)} candidate words, {len(phrases_all)} phrases, e.g. {phrases_all[:4]}")
    if args.context_only:
        return context_only(args, results, out_dir, smol_tok, words, phrases_all, t_run)
    tmp_root = Path(tempfile.mkdtemp(prefix="safedecode-scale-"))
    phases = [("vocabularies", lambda: bench_vocabularies(args, results, save, smol_tok, words, phrases_all, tmp_root))]
    if not args.no_e2e:
        phases.append(("end_to_end", lambda: bench_end_to_end(args, results, save)))
    if args.context_lengths:
        phases.append(("context", lambda: bench_context(args, results, save, smol_tok, words, phrases_all)))
    if not args.no_xgrammar:
        phases.append(("xgrammar", lambda: bench_xgrammar(args, results, save, smol_tok, words, phrases_all, tmp_root)))
    for name, fn in phases:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - recorded; the other phases still run
            traceback.print_exc()
            results.setdefault(name, {})
            if isinstance(results[name], dict):
                results[name]["error"] = f"{type(exc).__name__}: {exc}"
        save()
    results["targets"] = evaluate_targets(results)
    results["total_s"] = time.perf_counter() - t_run
    results["loadavg_end"] = list(os.getloadavg())
    save()
    harness.write_text(out_dir / "scale.md", render_markdown(results))
    try:
        plot(results, out_dir / "scale.png")
        if results.get("context", {}).get("runs"):
            plot_context(results, out_dir / "context.png")
    except Exception as exc:  # noqa: BLE001
        log(f"plot failed: {exc}")
    for t in results["targets"]:
        v = t["value"]
        log(f"target: {t['target']} [{t['where']}]: {'—' if v is None else f'{v:,.2f} ' + t['unit']} → "
            f"{'n/a' if t['met'] is None else ('met' if t['met'] else 'NOT met')}")
    log(f"done in {results['total_s']:.0f} s → {out_dir}/scale.{{md,json,png}}")
    return 0


def context_only(args, results, out_dir: Path, smol_tok, words, phrases_all, t_run) -> int:
    """``--context-only``: the context-length sweep alone, into context.{json,md,png}."""
    def save():
        harness.write_json(out_dir / "context.json", results)

    bench_context(args, results, save, smol_tok, words, phrases_all)
    results["total_s"] = time.perf_counter() - t_run
    results["loadavg_end"] = list(os.getloadavg())
    save()
    m = results["machine"]
    md = ["# safedecode: per-step time vs context length", "",
          f"Generated by `benchmarks/scale.py --context-only` on {m['date']} in {results['total_s']:.0f} s; "
          "wall-clock time on a shared machine, see benchmarks/README.md.", "", render_context(results), "",
          "## Machine", "", f"* CPU: {m['cpu_model']} ({m['usable_cores']} usable of {m['logical_cores']} logical cores)",
          f"* {m['platform']}; torch threads: {m['torch_threads']}; git commit {m.get('git_commit')}",
          f"* load average at start {m['loadavg_start']}, at end {results.get('loadavg_end')}", ""]
    harness.write_text(out_dir / "context.md", "\n".join(md))
    plot_context(results, out_dir / "context.png")
    print(render_context(results))
    log(f"done in {results['total_s']:.0f} s → {out_dir}/context.{{md,json,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
