"""Start ``safedecode serve`` in a subprocess on a free loopback port (tests and benchmarks)."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Optional, Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(*args: str, log: Optional[Path] = None, timeout: float = 300,
                   program: Sequence[str] = (sys.executable, "-m", "safedecode", "serve"),
                   cwd: Optional[Path] = None, env: Optional[dict] = None) -> Iterator[str]:
    """Yield the base URL (``http://127.0.0.1:PORT``) of ``PROGRAM --port PORT ARGS`` (default:
    ``safedecode serve``) once ``/health`` answers; stop the process on exit. ``program`` is the
    command that starts an OpenAI-compatible server (another environment's ``bin/safedecode serve``,
    vLLM's ``api_server``), started in ``cwd`` with ``env`` (default: this process's). The server's
    output goes to ``log`` (default: discarded). Raises RuntimeError (with the log's tail) if it
    exits or does not answer within ``timeout``."""
    port = free_port()
    env = dict(os.environ if env is None else env, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_NUM_THREADS", "1")
    command = [*program, "--port", str(port), *args]
    name = " ".join(Path(part).name for part in program[-2:])
    with open(log or os.devnull, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(base):
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not answer /health within {timeout:.0f} s:\n{tail}")
            time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
