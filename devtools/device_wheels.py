"""Download the wheels the device tool's H200 image lacks, at requirements/gpu.txt's pins, into one folder.

    python -m devtools.device_wheels            # -> .whl/ (ignored); carry it, then on the device:
    python3 -m pip install --no-deps --no-index --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD

The device image (see /work/.library/device/KINDS.md, "Python packages already there") has torch, transformers,
peft, accelerate, safetensors and Pillow, but not diffusers, the web stack or pydantic. The list below was read off
that image; a package missing from it fails a whole device call (python-dotenv, which pydantic-settings imports,
once cost two), so the list lives here instead of in someone's shell history. Python 3.12, x86_64 manylinux.
"""

import argparse
import subprocess
import sys
from pathlib import Path

from devtools.lock import ROOT, parse_pin, requirement_lines

# Runtime packages of requirements/gpu.txt that the device image does not have (or has too old for these pins).
MISSING_ON_DEVICE = (
    "diffusers",
    "importlib-metadata",
    "lazy-importer",
    "fastapi",
    "opentelemetry-api",  # fastapi 0.163 imports it
    "starlette",
    "uvicorn",
    "annotated-doc",
    "pydantic",
    "pydantic-core",
    "pydantic-settings",
    "python-dotenv",
    "annotated-types",
    "typing-inspection",
    "httpx2",
    "httpcore2",
    "truststore",
    "torchao",
)


def pins(requirements: Path = ROOT / "requirements" / "gpu.txt") -> dict[str, str]:
    """name -> version of every `name==version` line."""
    found = {}
    for line in requirement_lines(requirements.read_text()):
        if pin := parse_pin(line):
            found[pin[0]] = pin[1]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=ROOT / ".whl")
    args = parser.parse_args(argv)
    pinned = pins()
    absent = [name for name in MISSING_ON_DEVICE if name not in pinned]
    if absent:
        print(f"not pinned in requirements/gpu.txt: {', '.join(absent)} (run `make lock`)", file=sys.stderr)
        return 1
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(args.dest)]
    command += ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64"]
    command += ["--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64", "--platform", "any"]
    command += [f"{name}=={pinned[name]}" for name in MISSING_ON_DEVICE]
    return subprocess.run(command).returncode


if __name__ == "__main__":
    raise SystemExit(main())
