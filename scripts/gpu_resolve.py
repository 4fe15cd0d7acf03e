"""Prove that requirements-gpu.txt resolves, without installing or downloading it.

    python3 scripts/gpu_resolve.py [--python .venv-gpu/bin/python] [--clean] [--report report.json]

Runs `PYTHON -m pip install --dry-run --ignore-installed --report` on requirements-gpu.txt (pip reads
each wheel's metadata from the index, PEP 658, so no CUDA wheel is fetched) and checks what it chose:
- torch is a CUDA build (it requires CUDA runtime wheels; not a `+cpu` local wheel);
- the GPU packages (bitsandbytes, transformers, trl, ...) at their pinned versions;
- every requirement of requirements.txt is in requirements-gpu.txt with the same pin.
Prints the chosen versions and the time taken; exits 1 with a one-line error naming the problem and the fix.
--clean resolves as a fresh GPU machine would: the machine's pip configuration (find-links to local
wheels, constraints) is ignored. Standard library only: it runs before any project venv exists.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CPU_REQUIREMENTS = REPO / "requirements.txt"
GPU_REQUIREMENTS = REPO / "requirements-gpu.txt"
SHOWN = ("torch", "triton", "bitsandbytes", "transformers", "trl", "peft", "accelerate", "cuda-toolkit",
         "nvidia-cuda-runtime", "nvidia-cudnn-cu13")
# pip's configuration that points at this machine's own wheels (e.g. a local CPU torch); --clean drops it.
MACHINE_PIP_VARS = ("PIP_FIND_LINKS", "PIP_CONSTRAINT", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "PIP_NO_INDEX")


class Problem(Exception):
    """One line: what is wrong and the fix."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def read_requirements(path: Path) -> dict[str, str]:
    """canonical name -> the requirement's specifier text (e.g. "==2.13.0", ">=2.2,<3")."""
    out = {}
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*)", line)
        if not m:
            raise Problem(f"{path.name} line {lineno} is not a plain requirement ({raw.strip()!r}): write NAME[SPEC]")
        out[canonical(m.group(1))] = m.group(3).replace(" ", "")
    return out


def check_in_step(cpu: dict[str, str], gpu: dict[str, str]) -> None:
    """Every CPU requirement is in the GPU set with the same pin."""
    for name, spec in cpu.items():
        if name not in gpu:
            raise Problem(f"{name} is in requirements.txt but not in requirements-gpu.txt: add it there ({name}{spec})")
        if gpu[name] != spec:
            raise Problem(
                f"{name} is pinned {spec} in requirements.txt but {gpu[name]} in requirements-gpu.txt: make them the same"
            )


def resolve(python: str, report: Path, clean: bool) -> dict:
    """pip's dry-run report of requirements-gpu.txt, resolved by `python`'s pip."""
    env = dict(os.environ)
    if clean:
        for var in MACHINE_PIP_VARS:
            env.pop(var, None)
        env["PIP_CONFIG_FILE"] = os.devnull  # pip reads no configuration file at all
    cmd = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--disable-pip-version-check",
           "--report", str(report), "-r", str(GPU_REQUIREMENTS)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip() and "is ignored" not in ln]
        why = next((ln for ln in lines if ln.startswith("ERROR")), lines[-1] if lines else f"exit code {proc.returncode}")
        raise Problem(f"requirements-gpu.txt does not resolve ({why}): change the pins until pip accepts them")
    return json.loads(report.read_text(encoding="utf-8"))


def check_report(data: dict, gpu: dict[str, str]) -> dict[str, str]:
    """canonical name -> the version pip chose; raises Problem when the choice is not the GPU set."""
    chosen = {canonical(i["metadata"]["name"]): i for i in data.get("install", [])}
    versions = {name: item["metadata"]["version"] for name, item in chosen.items()}
    torch = chosen.get("torch")
    if torch is None:
        raise Problem("pip chose no torch for requirements-gpu.txt: keep torch==VERSION in it")
    needs = " ".join(torch["metadata"].get("requires_dist") or [])
    if "+cpu" in versions["torch"] or not re.search(r"nvidia-|cuda-", needs):
        raise Problem(
            f"pip chose a CPU-only torch ({versions['torch']} from {torch['download_info']['url']}): a local wheel or index "
            "in pip's configuration won; drop it (unset PIP_FIND_LINKS, PIP_CONFIG_FILE=/dev/null) or pass --clean here"
        )
    for name, spec in gpu.items():
        if spec.startswith("==") and versions.get(name) != spec[2:]:
            raise Problem(f"pip chose {name} {versions.get(name)} instead of requirements-gpu.txt's {spec[2:]}: fix the pin")
    return versions


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--python", default=sys.executable, help="the interpreter whose pip resolves (default: this one)")
    p.add_argument("--clean", action="store_true", help="ignore the machine's pip configuration (find-links, constraints)")
    p.add_argument("--report", default=None, help="keep pip's JSON report here (default: a temporary file)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        gpu = read_requirements(GPU_REQUIREMENTS)
        check_in_step(read_requirements(CPU_REQUIREMENTS), gpu)
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(args.report) if args.report else Path(tmp) / "report.json"
            data = resolve(args.python, report, args.clean)
        versions = check_report(data, gpu)
    except Problem as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    shown = ", ".join(f"{n} {versions[n]}" for n in SHOWN if n in versions)
    print(f"gpu_resolve: requirements-gpu.txt resolves to {len(versions)} packages ({shown}) "
          f"in {time.perf_counter() - start:.1f} s; nothing was installed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
