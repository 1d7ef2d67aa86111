#!/usr/bin/env python
"""Where a batch step's microseconds go (B=64, 1,000 phrases, SmolLM2's 49k vocabulary), against the
floor of the -inf writes themselves, single-threaded and with numba ``prange`` on every core.

    .venv/bin/python benchmarks/batch_breakdown.py            # ~1 min
    .venv/bin/python benchmarks/batch_breakdown.py --batch 32 --steps 100 --json OUT.json

A ``SafeLogitsProcessor`` for the same 1,000 random phrases as scale.py's batch sweep runs a stream
of B rows (each row a different offset of scale.py's script) on float32 logits. At each step, from
the same state (tracker and row tables restored, logits copied from the same base):

* *call*: the processor call (what scale.py reports; each row then takes its script token if left
  allowed, else the argmax, as in scale.py);
* *kernel*: ``kernels.guard_step(..., apply_mask=True)`` called directly;
* *advance*: the same with ``apply_mask=False`` (row recognition and state advance);
* *floor*: a bare numba loop writing -inf at exactly the ids the kernel masked in each row (taken
  from the kernel's output), with nothing else: no policy could mask these rows for less, one thread;
* *floor, prange*: the same loop with ``numba.prange`` over the rows (``--threads``, default every
  core), the shape a multi-threaded kernel would have.

*python* (call - kernel) holds the processor's Python and the call's colder caches: it runs first
in the step, after the previous step's argmax has read the whole batch of logits.

Also reported: the masked ids per row, and how many distinct automaton states the rows were in (rows
in the same state could share the lookup of their ids, never the writes).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import harness  # first: the offline environment, and the repository on sys.path

harness.one_omp_thread()

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import safedecode  # noqa: E402
from safedecode.engine import kernels  # noqa: E402
from safedecode.engine.device_mask import int_view  # noqa: E402


@numba.njit(cache=True)
def _floor(logits, ptr, ids, ninf):
    for i in range(logits.shape[0]):
        row = logits[i]
        for j in range(ptr[i], ptr[i + 1]):
            row[ids[j]] = ninf


@numba.njit(cache=True, parallel=True)
def _floor_prange(logits, ptr, ids, ninf):
    for i in numba.prange(logits.shape[0]):
        row = logits[i]
        for j in range(ptr[i], ptr[i + 1]):
            row[ids[j]] = ninf


def _p(xs, q):
    return float(np.percentile(np.asarray(xs) / 1e3, q)) if len(xs) else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--phrases", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=200, help="timed steps (default 200)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="numba threads for the prange floor")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from safedecode.models import load_default_tokenizer

    tok = load_default_tokenizer()
    V, B = len(tok), args.batch
    words = harness.vocabulary_words(tok)
    phrases = harness.make_phrases(words, args.phrases, harness.SEED)
    policy = safedecode.Policy(forbid=[{"literal": p} for p in phrases])
    compiled = safedecode.compile_policy(policy, tok)
    script = harness.make_script(tok, words, phrases, 4000, harness.SEED)
    prompt = harness.prompt_ids(tok)
    base = harness.random_logits(1, B, V, [tok.eos_token_id], harness.SEED)[0].float()
    harness.warm_kernels(harness.tiny_policy_compiled(tok), prompt, V, [B])
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))

    proc = safedecode.SafeLogitsProcessor(compiled)
    ids = torch.tensor([prompt] * B, dtype=torch.long)
    scores = base.clone()
    rec = {k: [] for k in ("call", "kernel", "advance", "floor", "floor_prange")}
    masked_per_row, distinct_states = [], []
    gc.disable()
    for step in range(args.warmup + args.steps):
        b = proc.batch
        if ids.shape[0] > b._rows.shape[0]:
            b._reserve(ids.shape[0])
        pre = (b._tracker.copy(), b._rows.copy(), b._pairs.copy())
        np_ids = ids.numpy()
        view = int_view(scores)
        scores.copy_(base)
        t8 = time.perf_counter_ns()
        proc(ids, scores)
        t9 = time.perf_counter_ns()
        post = (b._tracker.copy(), b._rows.copy(), b._pairs.copy())
        states = b._tracker[1:1 + B, :compiled.n_components].copy()
        masked = torch.isneginf(scores).numpy()
        chosen = scores.clone()
        b._tracker[:], b._rows[:], b._pairs[:] = pre
        t0 = time.perf_counter_ns()
        kernels.guard_step(compiled.blob, np_ids, b._tracker, b._rows, b._pairs, view[0], view[1], False)
        t1 = time.perf_counter_ns()
        b._tracker[:], b._rows[:], b._pairs[:] = pre
        scores.copy_(base)
        t2 = time.perf_counter_ns()
        kernels.guard_step(compiled.blob, np_ids, b._tracker, b._rows, b._pairs, view[0], view[1], True)
        t3 = time.perf_counter_ns()
        if not torch.equal(torch.isneginf(scores), torch.from_numpy(masked)):
            raise SystemExit("the kernel called directly masked other ids than the processor")
        b._tracker[:], b._rows[:], b._pairs[:] = post
        ptr = np.zeros(B + 1, np.int64)
        ptr[1:] = np.cumsum(masked.sum(axis=1))
        floor_ids = (np.flatnonzero(masked.ravel()) % V).astype(np.int64)
        scores.copy_(base)
        t4 = time.perf_counter_ns()
        _floor(view[0], ptr, floor_ids, view[1])
        t5 = time.perf_counter_ns()
        if not torch.equal(torch.isneginf(scores), torch.from_numpy(masked) | torch.isneginf(base)):
            raise SystemExit("the floor loop wrote other ids than the kernel")  # (EOS restored by the kernel aside)
        scores.copy_(base)
        t6 = time.perf_counter_ns()
        _floor_prange(view[0], ptr, floor_ids, view[1])
        t7 = time.perf_counter_ns()
        scores.copy_(chosen)
        # as harness.run_stream: each row takes its script token if it was left allowed, else the argmax
        want = torch.tensor([script[(r * 97 + step) % len(script)] for r in range(B)])
        ok = torch.isfinite(scores.gather(1, want[:, None]).squeeze(1))
        ids = torch.cat([ids, torch.where(ok, want, scores.argmax(-1))[:, None]], dim=1)
        if step >= args.warmup:
            for k, v in (("advance", t1 - t0), ("kernel", t3 - t2), ("floor", t5 - t4),
                         ("floor_prange", t7 - t6), ("call", t9 - t8)):
                rec[k].append(v)
            masked_per_row.append(float(np.mean(np.diff(ptr))))
            distinct_states.append(len({tuple(s) for s in states}))
    gc.enable()
    out = {"machine": harness.machine_info(1), "batch": B, "phrases": args.phrases, "vocab": V,
           "numba_threads": numba.get_num_threads(), "threading_layer": numba.threading_layer(),
           "masked_per_row_mean": float(np.mean(masked_per_row)),
           "distinct_states_mean": float(np.mean(distinct_states)),
           **{f"{k}_p50_us": _p(v, 50) for k, v in rec.items()}, **{f"{k}_p99_us": _p(v, 99) for k, v in rec.items()}}
    out["mask_p50_us"] = out["kernel_p50_us"] - out["advance_p50_us"]
    out["python_p50_us"] = out["call_p50_us"] - out["kernel_p50_us"]
    print(f"B={B}, {args.phrases} phrases, V={V:,}: {out['masked_per_row_mean']:.0f} ids masked per row, "
          f"{out['distinct_states_mean']:.1f} distinct states among {B} rows; numba threads {out['numba_threads']} "
          f"({out['threading_layer']})")
    print(f"{'':18} {'p50 µs':>9} {'µs/row':>8} {'p99 µs':>9}")
    for k in ("call", "kernel", "advance", "mask", "python", "floor", "floor_prange"):
        p50 = out[f"{k}_p50_us"]
        p99 = out.get(f"{k}_p99_us")
        print(f"{k:18} {p50:9.1f} {p50 / B:8.2f} {p99 if p99 is not None else float('nan'):9.1f}")
    if args.json:
        harness.write_json(harness.Path(args.json), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
