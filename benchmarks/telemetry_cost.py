#!/usr/bin/env python
"""Per-step cost of blocked-mass telemetry, side by side with the plain guard, in one run.

    .venv/bin/python benchmarks/telemetry_cost.py [--steps 300] [--out benchmarks/results]

A simulated decoding loop on SmolLM2's 49,152-token vocabulary with the shipped secrets policy:
each step copies fresh random logits (a few ids pushed toward a phrase the policy forbids, so some
steps are blocked), calls the processor (timed), and appends the argmax. Configurations: the plain
``SafeLogitsProcessor``, the same with ``telemetry=True``, and with telemetry plus an audit log.
Writes ``telemetry.md`` and ``telemetry.json``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import harness  # first: the offline environment, and the repository on sys.path

import numpy as np  # noqa: E402
import torch  # noqa: E402

from safedecode import SafeLogitsProcessor, load_policy  # noqa: E402
from safedecode.models import load_default_tokenizer  # noqa: E402


def run(processor, tokenizer, batch: int, steps: int, push: list[int]) -> list[int]:
    """Per-call wall times (ns) of ``steps`` calls on a growing batch, the first 10 left out."""
    rng = np.random.default_rng(0)
    ids = torch.full((batch, 1), tokenizer.eos_token_id, dtype=torch.long)
    base = torch.from_numpy(rng.normal(size=(64, batch, len(tokenizer))).astype(np.float32))
    times = []
    for step in range(steps):
        scores = base[step % 64].clone()
        scores[:, push[step % len(push)]] += 30.0
        start = time.perf_counter_ns()
        out = processor(ids, scores)
        times.append(time.perf_counter_ns() - start)
        ids = torch.cat([ids, out.argmax(-1, keepdim=True)], dim=1)
        if ids.shape[1] > 120:
            ids = ids[:, :1]
            processor.reset()
    return times[10:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tokenizer = load_default_tokenizer()
    policy = load_policy(harness.REPO / "grammars" / "secrets.toml")
    push = tokenizer.encode("-----BEGIN RSA PRIVATE KEY-----\n ok.", add_special_tokens=False)
    log = Path(tempfile.mkdtemp()) / "audit.jsonl"
    configs = {"guard": {}, "guard + telemetry": {"telemetry": True},
               "guard + telemetry + audit log": {"telemetry": True, "audit_log": log}}
    rows = []
    for batch in (1, 8):
        for name, options in configs.items():
            processor = SafeLogitsProcessor(policy, tokenizer, **options)
            times = run(processor, tokenizer, batch, args.steps, push)
            blocked = sum(r.summary()["blocked_steps"] for r in processor.telemetry.rows) if processor.telemetry else None
            timing = harness.summary(times)
            rows.append({"config": name, "batch": batch, "p50_us": round(timing["p50_us"], 1),
                         "p99_us": round(timing["p99_us"], 1), "blocked_steps_last_run": blocked})
            print(rows[-1], flush=True)
    harness.write_json(args.out / "telemetry.json", {"steps": args.steps, "rows": rows}, indent=2, newline=True)
    lines = ["# Telemetry cost per step (SmolLM2 vocabulary, grammars/secrets.toml)", "",
             f"`python benchmarks/telemetry_cost.py --steps {args.steps}`; one processor call per step, µs.", "",
             "| configuration | batch | p50 µs | p99 µs |", "|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['batch']} | {r['p50_us']} | {r['p99_us']} |" for r in rows]
    harness.write_text(args.out / "telemetry.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
