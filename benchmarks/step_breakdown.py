#!/usr/bin/env python
"""Where the microseconds of a B=1 safedecode step go, on structured outputs (JSON schemas) and plain
policies, with each compiled policy's table size and mask layout.

    .venv/bin/python benchmarks/step_breakdown.py                 # ~1-2 min
    .venv/bin/python benchmarks/step_breakdown.py --reps 5 --json OUT.json

For each case (benchmarks/structured.py's three schemas, alone and with the shipped ``secrets``
policy, and ``secrets`` alone) a ``SafeLogitsProcessor`` walks the schema's document (the same
canonical tokens as structured.py; ``secrets`` alone walks the person document) on a (1, 49152)
float32 row. At every step of every timed walk, from the same row state (tracker, row tables and
logits restored between the calls), three calls are timed:

* the processor call (what structured.py reports);
* ``kernels.guard_step(..., apply_mask=True)`` called directly (no Python around it);
* ``kernels.guard_step(..., apply_mask=False)`` (row recognition and state advance only).

Per step the median over the walks is taken, then p50/p99 over the steps. The breakdown (p50 over
steps): *Python* = processor call - direct kernel call (``__call__``, ``_ids``, ``GuideBatch.step``,
``int_view``: the numpy views); *dispatch* = a numba no-op taking the same 8 arguments; *advance* =
kernel without mask - dispatch; *mask* = kernel with mask - kernel without (the -inf writes of
every component and the EOS rule). Reference: ``torch.fill_(-inf)`` over the row and a numba
``row[:] = ninf`` (the floor of a mask that forbids almost everything).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import harness  # first: the offline environment, and the repository on sys.path

harness.one_omp_thread()

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import safedecode  # noqa: E402
from safedecode.engine import kernels  # noqa: E402
from safedecode.engine.device_mask import int_view  # noqa: E402



@numba.njit(cache=True)
def _noop8(blob, input_ids, tracker, rows, pairs, logits, ninf, apply_mask):
    return apply_mask


@numba.njit(cache=True)
def _fill(row, ninf):
    row[:] = ninf


def _median(xs):
    return float(np.median(xs)) / 1e3 if len(xs) else float("nan")


def run_case(label, compiled, tokens, prompt, logits_row, reps):
    V = logits_row.shape[1]
    blob = compiled.blob
    per_step = None  # [step][kind] -> list of ns
    for rep in range(reps + 1):
        proc = safedecode.SafeLogitsProcessor(compiled)
        ids = torch.tensor([prompt], dtype=torch.long)
        scores = logits_row.clone()
        steps = len(tokens) + 1
        if per_step is None:
            per_step = [{"call": [], "kernel": [], "advance": [], "dispatch": []} for _ in range(steps)]
        gc.disable()
        for j in range(steps):
            if j > 0:
                ids = torch.cat([ids, torch.tensor([[tokens[j - 1]]])], dim=1)
            b = proc.batch
            if ids.shape[0] > b._rows.shape[0]:
                b._reserve(ids.shape[0])
            snap = (b._tracker.copy(), b._rows.copy(), b._pairs.copy())
            np_ids = ids.numpy()
            view = int_view(scores)
            # kernel without the mask
            t0 = time.perf_counter_ns()
            kernels.guard_step(blob, np_ids, b._tracker, b._rows, b._pairs, view[0], view[1], False)
            t1 = time.perf_counter_ns()
            b._tracker[:], b._rows[:], b._pairs[:] = snap
            scores.copy_(logits_row)
            t2 = time.perf_counter_ns()
            kernels.guard_step(blob, np_ids, b._tracker, b._rows, b._pairs, view[0], view[1], True)
            t3 = time.perf_counter_ns()
            b._tracker[:], b._rows[:], b._pairs[:] = snap
            t4 = time.perf_counter_ns()
            _noop8(blob, np_ids, b._tracker, b._rows, b._pairs, view[0], view[1], True)
            t5 = time.perf_counter_ns()
            scores.copy_(logits_row)
            t6 = time.perf_counter_ns()
            proc(ids, scores)
            t7 = time.perf_counter_ns()
            if j == steps - 1 and compiled.eos_ids and not torch.isfinite(scores[0, compiled.eos_ids[0]]):
                raise SystemExit(f"{label}: EOS masked at the end of the document")
            if j < steps - 1 and not torch.isfinite(scores[0, tokens[j]]):
                raise SystemExit(f"{label}: the document's token {tokens[j]} masked at step {j}")
            if rep > 0:  # the first walk warms up
                s = per_step[j]
                s["advance"].append(t1 - t0)
                s["kernel"].append(t3 - t2)
                s["dispatch"].append(t5 - t4)
                s["call"].append(t7 - t6)
        gc.enable()
    med = {k: np.array([_median(s[k]) for s in per_step]) for k in ("call", "kernel", "advance", "dispatch")}
    out = {"steps": len(per_step),
           "call_p50_us": float(np.percentile(med["call"], 50)), "call_p99_us": float(np.percentile(med["call"], 99)),
           "kernel_p50_us": float(np.percentile(med["kernel"], 50)),
           "python_p50_us": float(np.percentile(med["call"] - med["kernel"], 50)),
           "dispatch_p50_us": float(np.percentile(med["dispatch"], 50)),
           "advance_p50_us": float(np.percentile(med["advance"] - med["dispatch"], 50)),
           "mask_p50_us": float(np.percentile(med["kernel"] - med["advance"], 50)),
           "mask_p99_us": float(np.percentile(med["kernel"] - med["advance"], 99))}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=15, help="timed walks per case (default 15)")
    ap.add_argument("--schemas", default="person,order,issue")
    ap.add_argument("--json", type=Path, help="write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from safedecode.channels.output_types import output_type
    from safedecode.models import load_default_tokenizer

    tok = load_default_tokenizer()
    V = len(tok)
    prompt = harness.prompt_ids(tok)
    logits_row = (torch.randn((1, V), generator=torch.Generator().manual_seed(harness.SEED)) * 4.0).float()
    harness.warm_kernels(harness.tiny_policy_compiled(tok), prompt, V, [1])
    secrets = safedecode.load_policy("secrets")
    cases = []
    for name in [s for s in args.schemas.split(",") if s]:
        otype = output_type(harness.SCHEMAS[name])
        tokens = tok.encode(json.dumps(harness.DOCUMENTS[name]), add_special_tokens=False)
        cases.append((f"{name}", otype.policy(None), tokens))
        cases.append((f"{name} + secrets", otype.policy(secrets), tokens))
    tokens = tok.encode(json.dumps(harness.DOCUMENTS["person"]), add_special_tokens=False)
    cases.append(("secrets (person document)", secrets, tokens))
    results = {"machine": harness.machine_info(1), "args": {k: str(v) for k, v in vars(args).items()}, "cases": []}
    # Reference fills.
    row = logits_row.clone()
    view = int_view(row)
    fills, nfills = [], []
    for _ in range(300):
        t0 = time.perf_counter_ns()
        row.fill_(float("-inf"))
        t1 = time.perf_counter_ns()
        _fill(view[0][0], view[1])
        t2 = time.perf_counter_ns()
        fills.append(t1 - t0)
        nfills.append(t2 - t1)
    results["fill_torch_p50_us"] = _median(fills)
    results["fill_numba_p50_us"] = _median(nfills)
    harness.log(f"reference: torch fill_ {results['fill_torch_p50_us']:.2f} µs, numba row[:] = ninf "
                f"{results['fill_numba_p50_us']:.2f} µs (dispatch included)")
    header = (f"{'case':28} {'MB':>7} {'states':>7} {'compl.':>6} {'call p50':>9} {'p99':>8} {'python':>7} "
              f"{'dispatch':>8} {'advance':>8} {'mask':>7} {'mask p99':>8}")
    print(header)
    for label, policy, tokens in cases:
        harness.clear_memory_cache()
        compiled = safedecode.compile_policy(policy, tok, cache_dir=False)
        st = compiled.stats
        r = run_case(label, compiled, tokens, prompt, logits_row, args.reps)
        r.update(case=label, table_mb=compiled.blob.nbytes / 1e6, token_states=st.get("token_states"),
                 complement_states=st.get("complement_states"), components=compiled.n_components)
        results["cases"].append(r)
        print(f"{label:28} {r['table_mb']:7.1f} {str(r['token_states']):>7} {str(r['complement_states']):>6} "
              f"{r['call_p50_us']:9.1f} {r['call_p99_us']:8.1f} {r['python_p50_us']:7.1f} {r['dispatch_p50_us']:8.2f} "
              f"{r['advance_p50_us']:8.1f} {r['mask_p50_us']:7.1f} {r['mask_p99_us']:8.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
