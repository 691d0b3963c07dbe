"""The peers' virtualenv (.venv-bench): requirements.txt and bench/requirements.txt, made on first use.

Dramatiq and Huey are not the app's dependencies: `python -m bench` runs them, their clients
and workers, with this virtualenv's interpreter. Like bin/_venv.sh it reinstalls only when a
requirements file changed (a hash of both kept in the virtualenv). BENCH_VENV_DIR puts it
elsewhere.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = (ROOT / "requirements.txt", ROOT / "bench" / "requirements.txt")


def venv_dir() -> Path:
    return Path(os.environ.get("BENCH_VENV_DIR", ROOT / ".venv-bench"))


def wanted() -> str:
    digest = hashlib.sha256()
    for path in REQUIREMENTS:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def ensure() -> Path:
    """The peers' interpreter, after creating the virtualenv or installing what changed."""
    venv = venv_dir()
    python = venv / "bin" / "python"
    stamp = venv / ".installed-bench"
    want = wanted()
    if python.exists() and stamp.exists() and stamp.read_text().strip() == want:
        return python
    started = time.monotonic()
    if not python.exists():
        print(f"==> creating virtualenv {venv} for the peers (Dramatiq, Huey)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    print(f"==> installing {', '.join(p.relative_to(ROOT).as_posix() for p in REQUIREMENTS)} into {venv}")
    command = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    for path in REQUIREMENTS:
        command += ["-r", str(path)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        noise = "neither a file nor a directory"  # pip configs that list absent local indexes
        errors = "\n".join(line for line in done.stderr.splitlines() if noise not in line)
        raise SystemExit(f"installing the peers' requirements failed:\n{errors[-3000:]}")
    stamp.write_text(want + "\n")
    print(f"    done in {time.monotonic() - started:.0f} s", flush=True)
    return python
