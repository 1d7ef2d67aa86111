#!/usr/bin/env python
"""CUDA check of the vLLM plugin's device path (safedecode.engine.device_mask); not part of `make test`.

1. A persistent-batch scenario (the stand-in of tests/support/vllm_batch.py: adds, removals,
   condensing moves, swaps; guarded rows under several policies, unguarded rows, one adversarial
   row): every step the same random logits go to a plugin on CUDA and one on CPU (numba kernels);
   the CUDA ``apply`` runs under ``torch.cuda.set_sync_debug_mode("error")``, so any host sync
   (``.item()``, ``bool(t)``, ``.cpu()``, a blocking copy) raises. Results must be bitwise equal.
2. ``DeviceMasks`` on CUDA vs the numba kernel for random states, float32 and bfloat16.
3. ``SafeLogitsProcessor`` on CUDA scores (its non-CPU branch) vs CPU: equal masks. (Not sync-free
   by design: transformers hands it ``input_ids`` on the device, which it reads on the host.)
4. Per-step time of the plugin's ``apply`` on CUDA at B = 1, 32, 256 guarded rows: host time (until
   ``apply`` returns) and device time (until the stream is idle).

Usage: python benchmarks/gpu_vllm_check.py   (prints a JSON summary; exit 0 = all equal and no
sync, 1 = a mismatch or a sync, 0 with "skipped" when CUDA is not available)
"""
from __future__ import annotations

import json
import random
import sys
import time

import harness  # noqa: F401 - first: the offline environment, and the repository on sys.path

import numpy as np  # noqa: E402
import torch  # noqa: E402

DEVICE = "cuda"  # a dry run of the script's logic can set "cpu"
POLICIES = [{"policy": {"forbid": [{"literal": "hunter2"}, {"regex": "ab+c"}]}}, "control-tokens", "secrets", None]


def load_tokenizer():
    """The embedded SmolLM2 tokenizer (49,152 ids) if installed, else the in-test SentencePiece one."""
    try:
        from safedecode.models import load_default_tokenizer

        return load_default_tokenizer()
    except FileNotFoundError:
        from tests.support.sentencepiece_fixture import build_sentencepiece_tokenizer

        return build_sentencepiece_tokenizer()


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def scenario(tokenizer, steps=80, seed=0) -> dict:
    from safedecode.integrations.vllm import SafeDecodeLogitsProcessor
    from tests.support.vllm_batch import PersistentBatch, Request

    rng = random.Random(seed)
    gpu = SafeDecodeLogitsProcessor(None, torch.device(DEVICE), True, tokenizer=tokenizer)
    cpu = SafeDecodeLogitsProcessor(None, torch.device("cpu"), False, tokenizer=tokenizer)
    batch, waiting = PersistentBatch(), [Request(POLICIES[i % len(POLICIES)], adversarial=i == 5) for i in range(40)]
    width, eos, mismatches, syncs, rows_checked = len(tokenizer), tokenizer.eos_token_id, 0, [], 0
    for step in range(steps):
        new = [waiting.pop(0) for _ in range(rng.randint(0, 4)) if waiting]
        size = len(batch.slots) + len(new)
        update = batch.step(new, [(rng.randrange(size), rng.randrange(size))] if size and rng.random() < 0.5 else [])
        gpu.update_state(update)
        cpu.update_state(update)
        if not batch.slots:
            continue
        host = torch.randn(len(batch.slots), width)
        device = host.to(DEVICE)
        torch.cuda.synchronize()
        if step > 0:  # step 0 warms up (first CUDA kernels, allocator)
            torch.cuda.set_sync_debug_mode("error")
        try:
            gpu.apply(device)
        except RuntimeError as exc:
            syncs.append(f"step {step}: {exc}")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        cpu.apply(host)
        mismatches += int(not torch.equal(bits(device), bits(host)))
        rows_checked += len(batch.slots)
        for i, req in enumerate(batch.slots):  # sample: argmax of the masked logits, or a forbidden id
            forbidden = torch.isneginf(host[i]).nonzero().flatten().tolist()
            if req.adversarial and len(forbidden) > 1 and rng.random() < 0.3:
                token = rng.choice([t for t in forbidden if t != eos])
            else:
                token = int(host[i].argmax()) if rng.random() < 0.5 else rng.randrange(width)
                token = eos if token in set(forbidden) else token
            req.output.append(token)
            req.done = token == eos or rng.random() < 0.05 or len(req.output) > 40
    return {"steps": steps, "rows_checked": rows_checked, "mismatching_steps": mismatches, "host_syncs": syncs}


def device_masks_vs_kernel(tokenizer, trials=40) -> dict:
    from safedecode.engine.compiled import compile_policy
    from safedecode.engine.device_mask import DeviceMasks, mask_rows
    from safedecode.policy.rules import load_policy as resolve_policy
    from safedecode.engine.kernels import unpack_tables

    compiled = compile_policy(resolve_policy("secrets"), tokenizer)
    n_states = [len(t["byte_state"]) for t in unpack_tables(compiled.blob)]
    rng = np.random.default_rng(1)
    masks, bad = DeviceMasks(DEVICE, pin_memory=True), 0
    for trial in range(trials):
        dtype = (torch.float32, torch.bfloat16)[trial % 2]
        batch = int(rng.integers(1, 33))
        rows = sorted(rng.choice(batch, size=int(rng.integers(1, batch + 1)), replace=False).tolist())
        states = [tuple(int(rng.integers(-1, n)) for n in n_states) for _ in rows]
        logits = torch.randn(batch, len(tokenizer) + 5).to(dtype)
        logits[rng.random(batch) < 0.3, tokenizer.eos_token_id] = float("-inf")
        on_cpu, on_gpu = logits.clone(), logits.to(DEVICE)
        mask_rows(on_cpu, rows, [compiled] * len(rows), states)
        masks.apply(on_gpu, rows, [compiled] * len(rows), states)
        bad += int(not torch.equal(bits(on_cpu), bits(on_gpu)))
    return {"trials": trials, "mismatches": bad}


def safe_logits_processor(tokenizer, steps=30) -> dict:
    from safedecode import Policy, SafeLogitsProcessor

    policy = Policy(forbid=[{"literal": "hunter2"}, {"regex": r"\d{3}"}])
    cpu, gpu = SafeLogitsProcessor(policy, tokenizer), SafeLogitsProcessor(policy, tokenizer)
    ids, bad = torch.full((4, 2), tokenizer.eos_token_id), 0
    for _ in range(steps):
        scores = torch.randn(4, len(tokenizer))
        a, b = cpu(ids.clone(), scores.clone()), gpu(ids.to(DEVICE), scores.to(DEVICE))
        bad += int(not torch.equal(torch.isneginf(a), torch.isneginf(b.cpu())))
        ids = torch.cat([ids, a.argmax(dim=-1, keepdim=True)], dim=1)
    return {"steps": steps, "mismatches": bad}


def timing(tokenizer, repeats=50) -> dict:
    from safedecode.integrations.vllm import SafeDecodeLogitsProcessor
    from tests.support.vllm_batch import BatchUpdate, SamplingParams

    text = tokenizer.encode("my key is sk-proj-4f9Qk2LmZx81NwTb and AKIA1234", add_special_tokens=False)
    out = {}
    for batch in (1, 32, 256):
        plugin = SafeDecodeLogitsProcessor(None, torch.device(DEVICE), True, tokenizer=tokenizer)
        outputs = [list(text[: 1 + i % len(text)]) for i in range(batch)]  # varied states
        plugin.update_state(BatchUpdate(batch, [], [(i, SamplingParams({"safedecode": "secrets"}), None, o)
                                                    for i, o in enumerate(outputs)], []))
        logits = torch.randn(batch, len(tokenizer), device=DEVICE)
        host_t, total_t = [], []
        for r in range(repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            plugin.apply(logits)
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            if r >= 5:
                host_t.append(t1 - t0)
                total_t.append(t2 - t0)
        out[f"B={batch}"] = {"host_p50_us": round(float(np.median(host_t)) * 1e6, 1),
                             "device_p50_us": round(float(np.median(total_t)) * 1e6, 1)}
    return out


def main() -> int:
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "CUDA is not available"}))
        return 0
    tokenizer = load_tokenizer()
    summary = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "vocab": len(tokenizer)}
    summary["scenario"] = scenario(tokenizer)
    summary["device_masks_vs_kernel"] = device_masks_vs_kernel(tokenizer)
    summary["safe_logits_processor"] = safe_logits_processor(tokenizer)
    summary["timing"] = timing(tokenizer)
    ok = (not summary["scenario"]["mismatching_steps"] and not summary["scenario"]["host_syncs"]
          and not summary["device_masks_vs_kernel"]["mismatches"] and not summary["safe_logits_processor"]["mismatches"])
    summary["ok"] = ok
    print(json.dumps(summary, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
