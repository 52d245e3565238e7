"""The pinned requirement files, generated from pyproject.toml with uv: `make lock` (python -m devtools.lock).

requirements/gpu.txt   the Docker image (the HTTP service, Ray Serve). Python 3.12, x86_64 Linux, torch 2.13.0 from
                       PyPI (the CUDA 13.0 build), torchvision 0.28.0 (spandrel's, torch 2.13.0's pair).
requirements/cog.txt   the Cog image (cog.yaml's build.python_requirements): the same, less what only the HTTP
                       service and Ray import (FastAPI, uvicorn, Ray). Self-contained on purpose: cog rejects `-r`
                       includes of local files.
requirements/cpu.txt   CPU development and CI (the Makefile): Python 3.11, the local CPU torch wheel (the folder in
                       PIP_FIND_LINKS, or --find-links), everything in it pinned and installed with pip --no-deps.
requirements-upscale.txt  the upscale extra's own pins, for `pip install --no-deps -r requirements-upscale.txt` beside
                       an existing install (the command service/upscale.py prints when spandrel is missing).

What goes into each is configured in pyproject.toml ([tool.punks.lock]). Each file's header records a hash of
pyproject's dependency tables; `python -m devtools.lock --check` (and tests/test_packaging.py) checks, offline,
that every file is current: same hash, every direct pin of pyproject present with the same version.
Regenerating keeps the versions already in a file where pyproject allows them (uv reads the old file as
preferences); `--upgrade` resolves everything anew.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
COMMAND = "make lock"
DIGEST_LINE = "# pyproject-deps-sha256: "
PLATFORM = "x86_64-manylinux_2_28"  # torch 2.13.0's Linux wheels; the CUDA base image and cog's are newer


@dataclass(frozen=True)
class Target:
    name: str
    path: Path
    what: str
    python: str
    extras: tuple[str, ...]
    omit: tuple[str, ...] = ()
    no_deps: tuple[str, ...] = ()
    local_wheels: bool = False  # resolve torch against the local CPU wheel instead of PyPI's CUDA build
    direct_only: bool = False  # only pyproject's own pins of the extras (no resolution), for pip --no-deps
    install: str = ""
    same_versions_as: Path | None = None  # a file resolved before this one, whose versions it keeps


def load_pyproject(path: Path = PYPROJECT) -> dict[str, Any]:
    return tomllib.loads(path.read_text())


def targets(pyproject: dict[str, Any], root: Path = ROOT) -> list[Target]:
    lock = pyproject["tool"]["punks"]["lock"]
    return [
        Target(
            name="gpu",
            path=root / "requirements" / "gpu.txt",
            what="the Docker image (Dockerfile): PyPI's torch, the CUDA 13.0 build",
            python=lock["gpu-python"],
            extras=tuple(lock["gpu-extras"]),
            install="pip install -r requirements/gpu.txt",
        ),
        Target(
            name="cog",
            path=root / "requirements" / "cog.txt",
            what="the Cog image (cog.yaml build.python_requirements): CUDA torch, no HTTP service or Ray",
            python=lock["gpu-python"],
            extras=tuple(lock["cog-extras"]),
            install="pip install -r requirements/cog.txt",
            same_versions_as=root / "requirements" / "gpu.txt",  # the two GPU images run the same versions
        ),
        Target(
            name="cpu",
            path=root / "requirements" / "cpu.txt",
            what="CPU development and CI (Makefile): torch is the local CPU wheel",
            python=lock["cpu-python"],
            extras=tuple(lock["cpu-extras"]),
            omit=tuple(lock.get("cpu-omit", ())),
            no_deps=tuple(lock.get("cpu-no-deps", ())),
            local_wheels=True,
            install="pip install --no-deps -r requirements/cpu.txt",
        ),
        Target(
            name="upscale",
            path=root / "requirements-upscale.txt",
            what="the optional Real-ESRGAN upscaler beside an existing install (PUNKS_UPSCALER=realesrgan)",
            python=lock["cpu-python"],
            extras=("upscale",),
            direct_only=True,
            install="pip install --no-deps -r requirements-upscale.txt",
        ),
    ]


def dependency_digest(pyproject: dict[str, Any]) -> str:
    """sha256 of what the generated files are made from: python version, dependencies, extras, lock settings."""
    project = pyproject["project"]
    tables = {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
        "lock": pyproject["tool"]["punks"]["lock"],
    }
    return hashlib.sha256(json.dumps(tables, sort_keys=True).encode()).hexdigest()


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*==\s*([^\s;#]+)")


def parse_pin(requirement: str) -> tuple[str, str] | None:
    """(normalized name, version) of `name==version` (extras and markers aside); None for anything else."""
    match = PIN.match(requirement.strip())
    return (normalize(match[1]), match[2]) if match else None


def public(version: str) -> str:
    return version.split("+")[0]  # 2.13.0+cpu is torch 2.13.0


def requirement_lines(text: str) -> list[str]:
    return [line.split("#")[0].strip() for line in text.splitlines() if line.split("#")[0].strip()]


def direct_requirements(pyproject: dict[str, Any], extras: tuple[str, ...], runtime: bool = True) -> list[str]:
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    return list(project.get("dependencies", []) if runtime else []) + [
        requirement for extra in extras for requirement in optional[extra]
    ]


def uv_command(target: Target, output: Path, find_links: str | None, upgrade: bool) -> list[str]:
    command = ["uv", "pip", "compile", "pyproject.toml", "--no-header", "--quiet"]
    command += ["--python-version", target.python, "--python-platform", PLATFORM]
    command += ["--index-url", "https://pypi.org/simple", "--output-file", str(output)]
    for extra in target.extras:
        command += ["--extra", extra]
    for package in target.omit:
        command += ["--no-emit-package", package]
    if target.local_wheels:
        if not find_links:
            raise SystemExit(
                "the CPU lock needs the local CPU torch wheel's folder: set PIP_FIND_LINKS or --find-links"
            )
        command += ["--find-links", find_links]
    if upgrade:
        command.append("--upgrade")
    return command


def header(target: Target, digest: str, command: list[str] | None) -> str:
    lines = [
        f"# Generated by `{COMMAND}` (python -m devtools.lock) from pyproject.toml: do not edit, regenerate.",
        f"# For {target.what}.",
    ]
    if command is None:
        lines += [
            f"# The pins of pyproject's extra {', '.join(target.extras)} only. Install: {target.install}",
            "# (its dependencies torch, safetensors, numpy and typing_extensions come with the service's own;",
            "# spandrel's torchvision is not needed: service/upscale.py stands in for it, see pyproject.toml)",
        ]
    else:
        lines += [
            f"# Python {target.python}, {PLATFORM}, pyproject extras: {', '.join(target.extras)}.",
            f"# Install: {target.install}",
            f"# Resolved with: {' '.join(command)}",
        ]
    if target.omit:
        lines.append(f"# Left out on purpose (pyproject [tool.punks.lock] cpu-omit): {', '.join(target.omit)}.")
    lines.append(DIGEST_LINE + digest)
    return "\n".join(lines) + "\n"


def uv_executable() -> str:
    beside = Path(sys.executable).with_name("uv")
    found = str(beside) if beside.is_file() else shutil.which("uv")
    if not found:
        raise SystemExit("uv is not installed: pip install uv (it is in the dev extra)")
    return found


def compile_target(target: Target, pyproject: dict[str, Any], find_links: str | None, upgrade: bool) -> None:
    if target.direct_only:
        direct = direct_requirements(pyproject, target.extras, runtime=False)
        pins = "".join(f"{requirement}\n" for requirement in direct)
        target.path.write_text(header(target, dependency_digest(pyproject), None) + pins)
        print(f"wrote {target.path.relative_to(ROOT)}")
        return
    target.path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / target.path.name
        preferences = target.same_versions_as or target.path
        if preferences.is_file():  # the current pins are uv's preferences: no churn without a reason
            shutil.copyfile(preferences, output)
        command = uv_command(target, output, find_links, upgrade)
        subprocess.run([uv_executable(), *command[1:]], cwd=ROOT, check=True)
        body = output.read_text()
    shown = [str(target.path.relative_to(ROOT)) if part == str(output) else part for part in command]
    text = header(target, dependency_digest(pyproject), shown) + body
    if target.no_deps:
        text += "# installed without their dependencies (pyproject [tool.punks.lock] cpu-no-deps)\n"
        text += "".join(f"{requirement}\n" for requirement in target.no_deps)
    target.path.write_text(text)
    print(f"wrote {target.path.relative_to(ROOT)}")


def problems(pyproject: dict[str, Any] | None = None, root: Path = ROOT) -> list[str]:
    """Why the generated files are not current with pyproject.toml (empty when they are). Offline and fast."""
    pyproject = pyproject if pyproject is not None else load_pyproject(root / "pyproject.toml")
    digest = dependency_digest(pyproject)
    found: list[str] = []
    for target in targets(pyproject, root):
        where = target.path.relative_to(root)
        if not target.path.is_file():
            found.append(f"{where} is missing")
            continue
        text = target.path.read_text()
        recorded = [line[len(DIGEST_LINE) :].strip() for line in text.splitlines() if line.startswith(DIGEST_LINE)]
        if recorded != [digest]:
            found.append(f"{where} was generated from other dependency tables than pyproject.toml's")
        lines = requirement_lines(text)
        pins: dict[str, str] = {}
        for line in lines:
            pin = parse_pin(line)
            if pin is None:
                found.append(f"{where}: not an exact pin: {line!r}")
            else:
                pins[pin[0]] = pin[1]
        direct = direct_requirements(pyproject, target.extras, runtime=not target.direct_only)
        if target.direct_only and sorted(direct) != sorted(lines):
            found.append(f"{where} should hold exactly pyproject's {', '.join(target.extras)} pins")
        for requirement in [*direct, *target.no_deps]:
            pin = parse_pin(requirement)
            if pin is None:
                found.append(f"pyproject.toml: not an exact pin: {requirement!r}")
            elif pin[0] not in pins:
                found.append(f"{where} lacks {requirement}")
            elif public(pins[pin[0]]) != pin[1]:
                found.append(f"{where} has {pin[0]}=={pins[pin[0]]}, pyproject.toml says {requirement}")
        omitted = [name for name in map(normalize, target.omit) if name in pins]
        found += [f"{where} has {name}, which cpu-omit leaves out" for name in omitted]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.lock", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that the files are current (offline)")
    parser.add_argument("--upgrade", action="store_true", help="resolve anew instead of keeping the current pins")
    parser.add_argument(
        "--find-links",
        default=os.environ.get("PIP_FIND_LINKS"),
        help="folder of the local CPU torch wheel (default: $PIP_FIND_LINKS)",
    )
    parser.add_argument("--only", choices=["gpu", "cog", "cpu", "upscale"], help="regenerate one file")
    args = parser.parse_args(argv)
    if not args.check:
        pyproject = load_pyproject()
        for target in targets(pyproject):
            if args.only in (None, target.name):
                compile_target(target, pyproject, args.find_links, args.upgrade)
    found = problems()
    for problem in found:
        print(f"stale: {problem}", file=sys.stderr)
    if found:
        print(f"regenerate with `{COMMAND}`", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
