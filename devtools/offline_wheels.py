"""Prepare a wheelhouse for a GPU host without internet access: the wheels of requirements/gpu.txt's pins.

    python -m devtools.offline_wheels                               # every pin -> .whl/ (ignored by git)
    python -m devtools.offline_wheels --skip torch transformers     # leave out what the host already has
    python -m devtools.offline_wheels --only diffusers fastapi      # just these
    # then, on the GPU host (Python 3.12, x86_64 Linux), from the copied checkout:
    python3 -m pip install --no-deps --no-index .whl/*.whl

The wheels are for Python 3.12 on x86_64 manylinux, the platform requirements/gpu.txt is resolved for, downloaded
without their dependencies: gpu.txt is complete, so the pins are the whole environment. A name that gpu.txt does
not pin is an error (run `make lock` after changing pyproject.toml).
"""

import argparse
import subprocess
import sys
from pathlib import Path

from devtools.lock import ROOT, normalize, parse_pin, requirement_lines

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux2014_x86_64", "manylinux_2_17_x86_64", "any")


def pins(requirements: Path = ROOT / "requirements" / "gpu.txt") -> dict[str, str]:
    """name -> version of every `name==version` line."""
    found = {}
    for line in requirement_lines(requirements.read_text()):
        if pin := parse_pin(line):
            found[normalize(pin[0])] = pin[1]
    return found


def selected(pinned: dict[str, str], only: list[str], skip: list[str]) -> tuple[list[str], list[str]]:
    """(the names to download, the names asked for that gpu.txt does not pin)."""
    asked = [normalize(name) for name in only + skip]
    unknown = [name for name in asked if name not in pinned]
    names = [normalize(name) for name in only] if only else sorted(pinned)
    return [name for name in names if name not in {normalize(s) for s in skip}], unknown


def download_command(pinned: dict[str, str], names: list[str], dest: Path) -> list[str]:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest)]
    command += ["--python-version", "3.12", "--implementation", "cp"]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    return command + [f"{name}=={pinned[name]}" for name in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=ROOT / ".whl")
    parser.add_argument("--only", nargs="*", default=[], metavar="NAME", help="download just these pins")
    parser.add_argument("--skip", nargs="*", default=[], metavar="NAME", help="pins the host already has")
    args = parser.parse_args(argv)
    pinned = pins()
    names, unknown = selected(pinned, args.only, args.skip)
    if unknown:
        print(f"not pinned in requirements/gpu.txt: {', '.join(unknown)} (run `make lock`)", file=sys.stderr)
        return 1
    return subprocess.run(download_command(pinned, names, args.dest)).returncode


if __name__ == "__main__":
    raise SystemExit(main())
