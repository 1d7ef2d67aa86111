#!/usr/bin/env python
"""Load benchmark of ``safedecode serve``: requests/s and latency under N concurrent clients.

    .venv/bin/python benchmarks/load.py              # 1, 4, 8 and 16 clients (8 requests, then 6 per client)
    .venv/bin/python benchmarks/load.py --quick      # 1 and 4 clients, one round
    .venv/bin/python benchmarks/load.py --max-batch 1    # the server without batching (one at a time)
    .venv/bin/python benchmarks/load.py --url http://127.0.0.1:8000   # an already running server
    .venv/bin/python benchmarks/load.py --agreement 64   # in process: greedy answers alone vs batched
    .venv/bin/python benchmarks/load.py --prefill-pause 2000 --threads 2   # in process: chunked prefill

Loopback only: it starts ``safedecode serve`` (embedded SmolLM2) on a free 127.0.0.1 port unless
``--url`` names a loopback server. Bounded: each scenario stops after ``--requests`` requests or
``--max-seconds``, whichever comes first (requests in flight then finish and are counted); the
scenarios are interleaved over ``--rounds`` rounds, so a change in the machine's load (a shared
machine) hits them alike.

Every request is streamed (so time to first token is measured too), asks for exactly
``--max-tokens`` tokens (``ignore_eos``, so every request does the same work) with greedy decoding,
and carries a distinct prompt. Scenarios: ``/v1/completions`` and ``/v1/chat/completions``, each
without a request policy and with ``grammars/secrets.toml`` (``"policy": "secrets"``). A chat
request is always guarded by its channel guard (control tokens, delimiters, links, leaks); "no
policy" means no rules beyond those. Each scenario runs with each number of ``--clients`` (1: the
latency of a request alone; more: throughput, and the latency with batching and queueing — the
embedded server batches up to ``--max-batch`` rows, by continuous batching). Writes ``load.json``
(every latency) and ``load.md``; with ``--dtype bfloat16`` (the server's ``--dtype``),
``load_bfloat16.{json,md}``.

``--agreement N`` measures something else, in process and without HTTP: N distinct greedy requests
(the four scenarios' kinds, prompts of different lengths) answered alone, then in groups of 8 that
start together, then in groups of 8 that join a running batch one per step (as the server's
continuous batching admits them); it counts the answers that differ (floating point: padding and
batch size change the model's numerics slightly, which can flip a near tie) and writes
``load_agreement.md`` (``load_agreement_bfloat16.md`` with ``--dtype bfloat16``).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import harness  # first: the offline environment, and the repository on sys.path

import httpx  # noqa: E402
from tqdm import tqdm  # noqa: E402

from safedecode.server.process import running_server  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
SCENARIOS = [  # (name, endpoint, request policy)
    ("completions, no policy", "completions", None),
    ("completions, policy secrets", "completions", "secrets"),
    ("chat, channel guard only", "chat", None),
    ("chat, channel guard + secrets", "chat", "secrets"),
]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def request_body(endpoint: str, policy, number: int, max_tokens: int) -> dict:
    body = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    text = f"Write a short note about the number {number}."
    body.update({"messages": [{"role": "user", "content": text}]} if endpoint == "chat" else {"prompt": text})
    if policy:
        body["safedecode"] = {"policy": policy}
    return body


async def one_request(client: httpx.AsyncClient, endpoint: str, body: dict) -> dict:
    """Stream one request; return its latency, time to first token and completion tokens."""
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            choice = (chunk.get("choices") or [{}])[0]
            if first is None and (choice.get("text") or (choice.get("delta") or {}).get("content")):
                first = time.perf_counter() - start
    return {"latency": time.perf_counter() - start, "ttft": first, "tokens": tokens}


async def run_part(base: str, endpoint: str, policy, clients: int, requests: int, seconds: float, label: str,
                   args, warm_up: bool) -> dict:
    """``clients`` concurrent clients until ``requests`` requests or ``seconds``: raw measurements."""
    results, errors = [], []
    issued = 0
    async with httpx.AsyncClient(base_url=base, timeout=args.max_seconds + 300,
                                 limits=httpx.Limits(max_connections=clients)) as client:
        if warm_up:  # compiles the scenario's policy; not timed
            await one_request(client, endpoint, request_body(endpoint, policy, 0, args.max_tokens))
        bar = tqdm(total=requests, desc=label, unit="req", leave=False)
        start = time.perf_counter()

        async def worker():
            nonlocal issued
            while issued < requests and time.perf_counter() - start < seconds:
                issued += 1
                body = request_body(endpoint, policy, 1000 + issued, args.max_tokens)
                try:
                    results.append(await one_request(client, endpoint, body))
                except (httpx.HTTPError, RuntimeError) as exc:
                    errors.append(str(exc))
                bar.update(1)

        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
        bar.close()
    return {"results": results, "errors": errors, "wall": wall, "cut_by_time": issued < requests}


def summarize(name: str, endpoint: str, policy, clients: int, parts: list[dict]) -> dict:
    """One scenario's numbers over all its rounds (requests/s = requests / summed wall time)."""
    results = [r for part in parts for r in part["results"]]
    errors = [e for part in parts for e in part["errors"]]
    wall = sum(part["wall"] for part in parts)
    latencies = [r["latency"] for r in results]
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in results)
    summary = {"scenario": name, "endpoint": endpoint, "policy": policy, "clients": clients, "requests": len(results),
               "errors": len(errors), "first_errors": errors[:3], "wall_s": round(wall, 3),
               "requests_per_s": round(len(results) / wall, 3) if wall else None,
               "tokens_per_s": round(tokens / wall, 2) if wall else None,
               "cut_by_time": any(part["cut_by_time"] for part in parts)}
    if latencies:
        summary.update(p50_s=round(percentile(latencies, 50), 3), p99_s=round(percentile(latencies, 99), 3))
    if ttfts:
        summary.update(ttft_p50_s=round(percentile(ttfts, 50), 3), ttft_p99_s=round(percentile(ttfts, 99), 3))
    summary["latencies_s"] = [round(v, 4) for v in latencies]
    return summary


def run_all(base: str, args) -> list[dict]:
    """Every scenario × number of clients, interleaved over ``--rounds`` rounds so that a change in
    the machine's load hits every scenario alike."""
    runs = [(name, endpoint, policy, clients, args.solo_requests if clients == 1 else args.requests_per_client * clients)
            for name, endpoint, policy in SCENARIOS for clients in args.client_counts]
    parts: dict[int, list[dict]] = {i: [] for i in range(len(runs))}
    for round_ in range(args.rounds):
        for i, (name, endpoint, policy, clients, requests) in enumerate(runs):
            share = math.ceil(requests / args.rounds)
            label = f"round {round_ + 1}/{args.rounds}: {name}, {clients} client(s)"
            parts[i].append(asyncio.run(run_part(base, endpoint, policy, clients, share,
                                                 args.max_seconds / args.rounds, label, args, round_ == 0)))
    return [summarize(name, endpoint, policy, clients, parts[i])
            for i, (name, endpoint, policy, clients, _) in enumerate(runs)]


def render_markdown(report: dict) -> str:
    config = report["config"]
    lines = [
        "# Load benchmark: `safedecode serve`",
        "",
        f"`benchmarks/load.py` — streaming clients on loopback, {config['max_tokens']} tokens per request "
        f"(`ignore_eos`, greedy); 1 client for {config['solo_requests']} requests, then "
        f"{', '.join(str(c) for c in config['client_counts'] if c > 1)} concurrent clients for "
        f"{config['requests_per_client']} requests per client (or {config['max_seconds']} s) per scenario, "
        f"interleaved over {config['rounds']} rounds; embedded {MODEL} on CPU, "
        f"`--max-batch {config['max_batch']}`" + (" (no batching)" if config['max_batch'] == 1 else "")
        + (f", the server's torch at {config['threads']} thread(s), `--dtype {config['dtype']}`."
           if config.get("threads") else "."),
        "",
        "| scenario | clients | requests | errors | requests/s | tokens/s | latency p50 (s) | latency p99 (s) | "
        "first token p50 (s) | first token p99 (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["scenarios"]:
        lines.append(f"| {s['scenario']} | {s['clients']} | {s['requests']}{' (time cap)' if s['cut_by_time'] else ''} | "
                     f"{s['errors']} | {s['requests_per_s']} | {s['tokens_per_s']} | {s.get('p50_s', '—')} | "
                     f"{s.get('p99_s', '—')} | {s.get('ttft_p50_s', '—')} | {s.get('ttft_p99_s', '—')} |")
    lines += ["", "Scaling against 1 client (same scenario): requests/s ratio, p50 latency ratio.", "",
              "| scenario | " + " | ".join(f"{c} clients" for c in config["client_counts"] if c > 1) + " |",
              "|---|" + "---|" * sum(c > 1 for c in config["client_counts"])]
    for name, _, _ in SCENARIOS:
        rows = {s["clients"]: s for s in report["scenarios"] if s["scenario"] == name}
        solo = rows.get(1)
        if not solo or not solo.get("requests_per_s") or not solo.get("p50_s"):
            continue
        cells = [f"{rows[c]['requests_per_s'] / solo['requests_per_s']:.2f}× req/s, "
                 f"{rows[c].get('p50_s', float('nan')) / solo['p50_s']:.2f}× p50"
                 for c in config["client_counts"] if c > 1 and rows.get(c, {}).get("requests_per_s")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    machine = report["machine"]
    lines += ["", f"Machine: {machine['platform']}, {machine['cpus']} CPUs, Python {machine['python']}, "
                  f"load average {machine['load_start']} at start and {machine['load_end']} at end "
                  f"(wall-clock numbers: other processes show up in them).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 and 4 clients, one round, fewer requests")
    ap.add_argument("--clients", help="numbers of concurrent clients, comma-separated (default 1,4,8,16; quick 1,4)")
    ap.add_argument("--requests-per-client", type=int,
                    help="requests per scenario and client with several clients (default 6: the batch then runs full between its ramp-up and ramp-down; quick 2)")
    ap.add_argument("--solo-requests", type=int, help="requests per scenario with one client (default 8, quick 3)")
    ap.add_argument("--max-seconds", type=float, default=180, help="time cap per scenario (default 180)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds over the scenarios (default 2, quick 1)")
    ap.add_argument("--max-batch", type=int, default=16, help="the started server's --max-batch (default 16)")
    ap.add_argument("--agreement", type=int, metavar="N",
                    help="instead: N greedy requests alone vs in batches of 8, in process (see above)")
    ap.add_argument("--prefill-pause", type=int, metavar="TOKENS",
                    help="instead: the running requests' longest gap between two tokens while a TOKENS-token "
                         "prompt joins, per prefill chunk size (in process)")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens per request (default 16)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="the started server's --dtype (default float32, the server's default)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="the started server's torch threads (OMP_NUM_THREADS; default: every core, as "
                         "`safedecode serve` uses by default)")
    ap.add_argument("--url", help="benchmark this loopback server instead of starting one")
    ap.add_argument("--out", default=str(harness.RESULTS))
    args = ap.parse_args(argv)
    args.client_counts = [int(c) for c in (args.clients or ("1,4" if args.quick else "1,4,8,16")).split(",")]
    args.requests_per_client = args.requests_per_client or (2 if args.quick else 6)
    args.solo_requests = args.solo_requests or (3 if args.quick else 8)
    args.rounds = args.rounds or (1 if args.quick else 2)
    if args.url:
        args.threads = args.dtype = None  # the running server's own
    if args.url and urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        ap.error("--url must be a loopback address (this benchmark never leaves the machine)")
    load_start = os.getloadavg()[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.agreement:
        return agreement(args.agreement, out, args.dtype or "float32")
    if args.prefill_pause:
        return prefill_pause(args.prefill_pause, out, args.threads or 1)

    if args.url:
        scenarios = run_all(args.url.rstrip("/"), args)
    else:
        print("starting safedecode serve (embedded model)...", file=sys.stderr, flush=True)
        log = Path(tempfile.gettempdir()) / "safedecode-load-server.log"  # kept if the server fails
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        with running_server("--max-batch", str(args.max_batch), "--dtype", args.dtype, log=log, env=env) as base:
            scenarios = run_all(base, args)
        log.unlink(missing_ok=True)
    report = {"config": {k: v for k, v in vars(args).items() if k != "out"}, "scenarios": scenarios,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_start": round(load_start, 2), "load_end": round(os.getloadavg()[0], 2)}}
    stem = f"load_{args.dtype}" if args.dtype not in (None, "float32") else "load"
    harness.write_json(out / f"{stem}.json", report)
    harness.write_text(out / f"{stem}.md", render_markdown(report))
    print(render_markdown(report))
    return 0 if all(s["errors"] == 0 for s in scenarios) else 1


def agreement(count: int, out: Path, dtype: str = "float32") -> int:
    """``count`` distinct greedy requests (completions and chat, with and without ``secrets``,
    prompts of different lengths), 16 tokens each, answered alone, then in groups of 8 that start
    together (one left-padded prefill), then in groups of 8 that join a running batch one per step
    (continuous batching: each joins with its own prefill, its cache padded to the others'), in
    process through the server's own preparation and :class:`~safedecode.server.worker.Batch`."""
    import torch

    torch.set_num_threads(1)
    from safedecode.server.app import Server
    from safedecode.server.schemas import ChatRequest, CompletionRequest
    from safedecode.server.worker import Batch, Engine, load_model

    model, tokenizer, _ = load_model("default", dtype)
    engine = Engine(model, tokenizer, max_queue=count, max_batch=8)
    server = Server(engine, MODEL)

    def job(i: int):
        _, endpoint, policy = SCENARIOS[i % len(SCENARIOS)]
        body = request_body(endpoint, policy, 1000 + 37 * i, 16)
        body.update(stream=False, ignore_eos=False)
        body.pop("stream_options")
        filler = " Please." * (i % 5)  # prompts of different lengths: different padding in a batch
        if endpoint == "chat":
            body["messages"][0]["content"] += filler
            return server.prepare_chat(ChatRequest(**body)).job
        body["prompt"] += filler
        return server.prepare_completion(CompletionRequest(**body)).job

    def run(jobs, staggered: bool = False):
        done = {}
        batch = Batch(engine, on_done=lambda j, outcomes: done.__setitem__(id(j), outcomes[0].text))
        for group in ([j] for j in jobs) if staggered else [jobs]:
            batch.admit(group)
            if staggered and not batch.empty:
                batch.step()
        while not batch.empty:
            batch.step()
        return [done[id(j)] for j in jobs]

    alone = [run([job(i)])[0] for i in tqdm(range(count), desc="alone", leave=False)]
    modes = {"together": "groups of 8 starting together", "staggered": "groups of 8 joining one per step"}
    answers, lines = {}, ["# Greedy answers alone vs batched: `safedecode serve`'s embedded engine", "",
                          f"`benchmarks/load.py --agreement {count}{'' if dtype == 'float32' else ' --dtype ' + dtype}` "
                          f"— {count} distinct greedy requests (the load scenarios' four kinds in turn, prompts of 5 "
                          f"lengths), 16 tokens, answered alone and then in batches; embedded {MODEL} on CPU, "
                          f"{dtype}, one torch thread.", ""]
    for mode, label in modes.items():
        answers[mode] = []
        for start in tqdm(range(0, count, 8), desc=label, leave=False):
            answers[mode] += run([job(i) for i in range(start, min(count, start + 8))], staggered=mode == "staggered")
        differ = [i for i in range(count) if alone[i] != answers[mode][i]]
        first_token = [i for i in differ if answers[mode][i][:1] != alone[i][:1]]
        lines += [f"**{label}: {count - len(differ)} of {count} identical** to the answer alone; {len(differ)} differ "
                  f"({len(first_token)} from the first character on).", ""]
        lines += [f"* request {i}: alone {alone[i]!r} / batched {answers[mode][i]!r}" for i in differ[:10]]
        lines += [""] if differ else []
    engine.close()
    stem = "load_agreement" if dtype == "float32" else f"load_agreement_{dtype}"
    harness.write_json(out / f"{stem}.json", {"count": count, "dtype": dtype, "alone": alone, **answers})
    harness.write_text(out / f"{stem}.md", "\n".join(lines).rstrip() + "\n")
    print("\n".join(lines))
    return 0


def prefill_pause(tokens: int, out: Path, threads: int) -> int:
    """4 greedy requests decoding (32 tokens each) while a request whose prompt is ``tokens`` tokens
    long joins after their 4th token: the running requests' longest gap between two tokens, and the
    long request's time to its first token, per prefill chunk size (whole prompt at once, 512, 256,
    64), in process through :class:`~safedecode.server.worker.Batch`."""
    import torch

    torch.set_num_threads(threads)
    from safedecode.server.app import Server
    from safedecode.server.schemas import CompletionRequest
    from safedecode.server.worker import Batch, Engine, load_model

    model, tokenizer, _ = load_model("default")
    rows = []
    for chunk in (None, 512, 256, 64):
        engine = Engine(model, tokenizer, max_queue=8, prefill_chunk=chunk or 1 << 30)
        server = Server(engine, MODEL)

        def job(text: str, max_tokens: int):
            body = dict(model=MODEL, prompt=text, max_tokens=max_tokens, temperature=0, ignore_eos=True,
                        safedecode={"policy": "secrets"})
            return server.prepare_completion(CompletionRequest(**body)).job

        batch = Batch(engine, on_done=lambda job, outcomes: None)
        batch.admit([job("Warm up.", 1)])  # the batch learns that the cache can be joined
        while not batch.empty:
            batch.step()
        running = [job(f"Write a short note about the number {i}.", 32) for i in range(4)]
        batch.admit(running)
        long = job("Some context. " * (tokens // 3), 4)
        gaps, last, joined_at, first_token = [], time.perf_counter(), None, None
        step = 0
        while not batch.empty:
            if step == 4:
                joined_at = time.perf_counter()
                batch.admit([long])
            decoding = any(j.trackers[0].tokens < 32 for j in running)  # the running requests get a token
            batch.step()
            now = time.perf_counter()
            if decoding:
                gaps.append(now - last)
            if first_token is None and long.trackers[0].tokens and joined_at:
                first_token = now - joined_at
            last, step = now, step + 1
        engine.close()
        rows.append({"chunk": chunk, "prompt_tokens": len(long.input_ids), "max_gap_s": round(max(gaps), 3),
                     "median_gap_s": round(sorted(gaps)[len(gaps) // 2], 3),
                     "long_first_token_s": round(first_token, 3) if first_token else None})
        print(rows[-1], flush=True)
    lines = ["# Chunked prefill: the running requests' pause while a long prompt joins", "",
             f"`benchmarks/load.py --prefill-pause {tokens}` — 4 greedy requests decoding 32 tokens each "
             f"(`secrets` policy) while a {rows[0]['prompt_tokens']}-token prompt joins after their 4th token; "
             f"embedded {MODEL}, float32, {threads} torch thread(s), in process.", "",
             "| prefill chunk | running requests: longest gap between tokens (s) | median gap (s) | "
             "long prompt: first token after (s) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['chunk'] or 'whole prompt'} | {r['max_gap_s']} | {r['median_gap_s']} | "
                     f"{r['long_first_token_s']} |")
    harness.write_json(out / "load_prefill.json", {"tokens": tokens, "threads": threads, "rows": rows})
    harness.write_text(out / "load_prefill.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
