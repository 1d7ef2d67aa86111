"""GPU-path check of SafeLogitsProcessor (run on a machine with CUDA; not part of `make test`).

1. Masks computed for CUDA logits equal those for the same CPU logits, step by step, at B=1 and 8.
2. ``model.generate`` on CUDA (a tiny random Llama, greedy and beam search) runs under the guard and
   its outputs contain no violation (checked by the regex oracle).
3. Per-step time of the processor on CUDA logits (the current path computes the mask on the host:
   one device→host copy of the last ids and one host→device copy of the mask per step).

Usage: python benchmarks/gpu_check.py   (prints a JSON summary; exits 1 on a mismatch)
"""
import json
import os
import sys
import time

import harness  # noqa: F401 - first: the offline environment, and the repository on sys.path

os.environ.setdefault("SAFEDECODE_CACHE_DIR", "")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from safedecode import Policy, SafeLogitsProcessor, find_violations  # noqa: E402
from tests.support.sentencepiece_fixture import build_sentencepiece_tokenizer  # noqa: E402

POLICY = Policy(forbid=[{"literal": "shells"}, {"regex": r"qu[a-z]+k"}, {"literal": "Hello", "ignore_case": True},
                        {"regex": r"\d{3}"}])


def compare_masks(tokenizer, batch, steps=100):
    cpu, gpu = SafeLogitsProcessor(POLICY, tokenizer), SafeLogitsProcessor(POLICY, tokenizer)
    rng = torch.Generator().manual_seed(batch)
    ids = torch.full((batch, 3), tokenizer.bos_token_id, dtype=torch.long)
    timings = []
    for _ in range(steps):
        scores = torch.randn(batch, len(tokenizer), generator=rng)
        masked_cpu = cpu(ids.clone(), scores.clone())
        ids_gpu, scores_gpu = ids.cuda(), scores.cuda()
        torch.cuda.synchronize()
        start = time.perf_counter()
        masked_gpu = gpu(ids_gpu, scores_gpu)
        torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
        if not torch.equal(torch.isneginf(masked_cpu), torch.isneginf(masked_gpu.cpu())):
            return False, timings
        ids = torch.cat([ids, torch.argmax(masked_cpu, dim=-1, keepdim=True)], dim=1)
    return True, timings


def generate_on_gpu(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config).cuda().eval()
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(["She sells", "The quick brown", "Hello"], return_tensors="pt", padding=True).to("cuda")
    texts = []
    for kwargs in ({"do_sample": False}, {"num_beams": 3, "do_sample": False}, {"do_sample": True}):
        guard = SafeLogitsProcessor(POLICY, tokenizer)
        out = model.generate(**enc, logits_processor=LogitsProcessorList([guard]), max_new_tokens=24,
                             pad_token_id=tokenizer.eos_token_id, **kwargs)
        texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return texts


def main():
    assert torch.cuda.is_available(), "needs CUDA"
    tokenizer = build_sentencepiece_tokenizer()
    summary = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    ok = True
    for batch in (1, 8):
        equal, timings = compare_masks(tokenizer, batch)
        ok &= equal
        t = np.array(timings[10:]) * 1e6
        summary[f"B={batch}"] = {"masks_equal_cpu_vs_cuda": equal, "p50_us": round(float(np.percentile(t, 50)), 1),
                                 "p99_us": round(float(np.percentile(t, 99)), 1)}
    texts = generate_on_gpu(tokenizer)
    violations = [t for t in texts if find_violations(POLICY, t)]
    summary["generate_on_cuda"] = {"outputs": len(texts), "violating": len(violations),
                                   "non_empty": sum(bool(t.strip()) for t in texts)}
    ok &= not violations
    print(json.dumps(summary, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
