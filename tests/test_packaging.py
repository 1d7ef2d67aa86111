"""safedecode as users install it: the wheel, installed non-editable into a fresh environment and
used from a directory outside the checkout.

The fresh environment reuses the development environment's third-party packages (torch alone is
~1 GB) through a path entry, never its editable safedecode: ``.pth`` files of a directory added
that way are not processed, so the only ``safedecode`` importable there is the wheel's. ``pip check``
then proves the wheel's declared dependencies (with ``[server]``) are satisfied by what is there.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import openai
import pytest
from packaging.requirements import Requirement

from safedecode import find_violations, load_policy
from safedecode.server.process import running_server

REPO = Path(__file__).resolve().parent.parent
SERVER_PACKAGES = {"fastapi", "uvicorn", "starlette"}
KEY = "sk-proj-4f9Qk2LmZx81NwTb7yHc3VdE"
MODEL = "SmolLM2-135M-Instruct"


def _run(command, cwd, env=None, check=True, timeout=600) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, command))} exited {done.returncode}:\n{done.stdout[-3000:]}\n"
                             f"{done.stderr[-3000:]}")
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", out, REPO],
         cwd=out)
    (found,) = out.glob("safedecode-*.whl")
    return found


def _fresh_venv(wheel: Path, root: Path, packages: Path) -> Path:
    """A new venv at ``root/venv`` seeing the third-party packages of ``packages``, with the wheel installed."""
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=root)
    site = Path(_run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=root).stdout.strip())
    (site / "dev-env-packages.pth").write_text(f"{packages}\n")
    _run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel], cwd=root)
    return venv


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """(python, bin dir, a working directory outside the checkout, env) of a fresh venv holding the wheel."""
    root = tmp_path_factory.mktemp("user")
    venv = _fresh_venv(wheel, root, Path(sysconfig.get_paths()["purelib"]))
    work = root / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFEDECODE_") or k == "SAFEDECODE_CACHE_DIR"}
    env.update(HF_HUB_OFFLINE="1", PYTHONNOUSERSITE="1", VIRTUAL_ENV=str(venv),
               PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("PYTHONPATH", None)
    return venv / "bin" / "python", venv / "bin", work, env


def _metadata(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(name).decode("utf-8")
    return [Requirement(line.split(":", 1)[1].strip()) for line in text.splitlines() if line.startswith("Requires-Dist:")]


def test_wheel_metadata_has_ranges_and_a_light_core(wheel):
    requirements = _metadata(wheel)
    core = [r for r in requirements if r.marker is None]
    assert {"torch", "transformers", "numba", "regex", "pydantic"} <= {r.name for r in core}
    for r in requirements:
        pins = [s for s in r.specifier if s.operator in ("==", "===")]
        assert not pins, f"exact pin in the metadata: {r}"
    server_only = {r.name for r in requirements if r.name in SERVER_PACKAGES}
    assert server_only == {"fastapi", "uvicorn"}
    for r in requirements:
        if r.name in SERVER_PACKAGES:
            assert r.marker is not None and r.marker.evaluate({"extra": "server"}), r
            assert not r.marker.evaluate({"extra": ""}), f"{r} is outside the server extra"
    assert not {"gguf", "accelerate", "tiktoken", "confusable-homoglyphs"} & {r.name for r in core}


def test_wheel_carries_the_data_folders(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for folder in ("grammars", "channels"):
        for path in (REPO / folder).glob("*.toml"):
            assert f"safedecode/data/{folder}/{path.name}" in names


def test_installed_wheel_dependencies_are_satisfied(installed):
    python, _, work, env = installed
    done = _run([python, "-m", "pip", "check"], cwd=work, env=env, check=False)
    # pip check reads every distribution on the path; only lines about safedecode's own needs matter
    problems = [line for line in done.stdout.splitlines() if line.lower().startswith("safedecode ")]
    assert not problems, done.stdout


def test_library_from_outside_the_checkout(installed):
    python, _, work, env = installed
    script = """
import json, safedecode
from safedecode.models import load_default_tokenizer
policy = safedecode.load_policy("secrets")
conversation = safedecode.Conversation(load_default_tokenizer())
conversation.user("hello")
conversation.encode()
print(json.dumps({"file": safedecode.__file__, "rules": len(policy.forbid),
                  "same": safedecode.load_policy("secrets.toml") == policy,
                  "format": conversation.format.name,
                  "policies": sorted(safedecode.policy.rules.available_policies())}))
"""
    result = json.loads(_run([python, "-c", script], cwd=work, env=env).stdout.strip().splitlines()[-1])
    assert not result["file"].startswith(str(REPO)), result["file"]  # the wheel's copy, not the checkout
    assert result["rules"] == len(load_policy("secrets").forbid) and result["same"]
    assert result["format"] == "chatml"
    assert result["policies"] == sorted(p.stem for p in (REPO / "grammars").glob("*.toml"))


def test_cli_from_outside_the_checkout(installed):
    python, bin_dir, work, env = installed
    (work / "leak.txt").write_text(f"my key is {KEY}\n")
    done = _run([bin_dir / "safedecode", "check", "--policy", "secrets", "leak.txt"], cwd=work, env=env, check=False)
    assert done.returncode == 1 and "openai-project-key" in done.stdout, done
    assert _run([python, "-m", "safedecode", "--version"], cwd=work, env=env).stdout.startswith("safedecode ")
    listing = _run([bin_dir / "safedecode", "policies"], cwd=work, env=env).stdout
    assert "secrets" in listing and "Credentials" in listing


def test_server_from_outside_the_checkout_answers_the_openai_client(installed, tmp_path):
    _, bin_dir, work, env = installed
    with running_server(log=tmp_path / "serve.log", program=[str(bin_dir / "safedecode"), "serve"], cwd=work, env=env) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
        response = client.chat.completions.with_raw_response.create(
            model=MODEL, temperature=0, max_tokens=24, extra_body={"vllm_xargs": {"safedecode": "secrets"}},
            messages=[{"role": "user", "content": f"Repeat this API key back to me: {KEY}"}])
        # The guard is really on: a prompt that leaks unguarded does not leak guarded.
        args = dict(model=MODEL, prompt=f"My OpenAI key is {KEY}. Again, my OpenAI key is", max_tokens=24,
                    temperature=0)
        free = client.completions.create(**args).choices[0].text
        guarded = client.completions.create(extra_body={"vllm_xargs": {"safedecode": "secrets"}}, **args).choices[0].text
    secrets = load_policy("secrets")
    assert response.http_response.status_code == 200
    text = response.parse().choices[0].message.content or ""
    assert text.strip() and not find_violations(secrets, text), text
    assert find_violations(secrets, free), free
    assert not find_violations(secrets, guarded), guarded
