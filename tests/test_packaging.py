"""Packaging: pyproject.toml, the pinned files generated from it (devtools/lock.py), the wheel, the console
script, and the GPU images' build files (cog.yaml, Dockerfile, the two dockerignore files). Offline and fast."""

import ast
import copy
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from devtools import lock

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = lock.load_pyproject(ROOT / "pyproject.toml")
DEV_FOLDERS = ("devtools", "tests", "bench", "train")


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in lock.requirement_lines(path.read_text()):
        pin = lock.parse_pin(line)
        assert pin is not None, f"{path.name}: not an exact pin: {line!r}"
        found[pin[0]] = pin[1]
    return found


def pyproject_pin(name: str, extra: str | None = None) -> str:
    table = PYPROJECT["project"]["optional-dependencies"][extra] if extra else PYPROJECT["project"]["dependencies"]
    return dict(p for p in map(lock.parse_pin, table) if p is not None)[lock.normalize(name)]


# --- the generated files ---------------------------------------------------------------------------


def test_generated_files_are_current_with_pyproject():
    assert lock.problems(PYPROJECT, ROOT) == [], "regenerate them: make lock"


@pytest.mark.parametrize("change", ["pin", "new dependency", "extra"])
def test_a_changed_pyproject_makes_them_stale(change: str):
    changed = copy.deepcopy(PYPROJECT)
    project = changed["project"]
    if change == "pin":
        project["dependencies"] = [
            d if not d.startswith("diffusers==") else "diffusers==0.1.0" for d in project["dependencies"]
        ]
    elif change == "new dependency":
        project["dependencies"].append("left-pad==1.0")
    else:
        project["optional-dependencies"]["http"].append("gunicorn==1.0")
    found = lock.problems(changed, ROOT)
    assert any("other dependency tables" in problem for problem in found)  # the recorded hash
    assert any(name in problem for problem in found for name in ("diffusers", "left-pad", "gunicorn"))


def test_every_pyproject_dependency_is_an_exact_pin():
    tables = [PYPROJECT["project"]["dependencies"], *PYPROJECT["project"]["optional-dependencies"].values()]
    assert [r for table in tables for r in table if lock.parse_pin(r) is None] == []


def test_gpu_requirements_are_one_self_contained_pinned_file():
    text = (ROOT / "requirements" / "gpu.txt").read_text()
    lines = lock.requirement_lines(text)
    assert not [line for line in lines if line.startswith("-")], "cog rejects -r/-c of local files"
    gpu = pins(ROOT / "requirements" / "gpu.txt")  # every line an exact pin
    assert gpu["torch"] == pyproject_pin("torch") == "2.13.0", "PyPI's CUDA build, no local version"
    assert gpu["torchvision"] == "0.28.0", "torch 2.13.0's own torchvision (spandrel needs one)"
    assert "nvidia-cudnn-cu13" in gpu and "cuda-toolkit" in gpu, "CUDA 13.0 comes as wheels (cog.yaml cuda: 13.0)"
    for extra in lock.targets(PYPROJECT, ROOT)[0].extras:  # the image serves HTTP and the optional upscaler
        for requirement in PYPROJECT["project"]["optional-dependencies"][extra]:
            name, version = lock.parse_pin(requirement) or ("", "")
            assert gpu.get(name) == version, requirement
    assert "setuptools" in gpu, "the Dockerfile installs the package with --no-build-isolation"
    assert not set(gpu) & {"pytest", "cog", "ruff", "mypy"}, "development tools in the GPU image"


def test_cog_requirements_hold_what_the_runner_imports_and_no_http_or_ray():
    """The Cog image installs requirements/cog.txt: the runner (predict.py, setup's weight fetch, the engine, the
    optional upscaler) imports with FastAPI, uvicorn and Ray blocked, and every distribution of the Docker image it
    imports is pinned there, at the same version."""
    cog_pins = pins(ROOT / "requirements" / "cog.txt")
    gpu = pins(ROOT / "requirements" / "gpu.txt")
    http_and_ray = {"fastapi", "uvicorn", "starlette", "ray", "fastapi-offline"}
    assert not set(cog_pins) & http_and_ray
    assert all(gpu[name] == version for name, version in cog_pins.items()), "the two images' versions differ"
    script = (
        "import importlib.abc, importlib.metadata as m, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('fastapi', 'uvicorn', 'starlette', 'ray', 'fastapi_offline'):\n"
        "            raise ImportError(f'{name} is not in the Cog image')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import predict, service.weights.pinned, service.loading, service.upscale\n"
        "d = m.packages_distributions()\n"
        "loaded = [name for name, mod in list(sys.modules.items()) if getattr(mod, '__file__', None)]\n"
        "print(' '.join(sorted({n for name in loaded for n in d.get(name.split('.')[0], [])})))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    imported = {lock.normalize(name) for name in done.stdout.split()}  # namespace packages (google) aside
    assert {"torch", "diffusers", "prometheus-client", "httpx"} <= imported
    missing = (imported & set(gpu)) - set(cog_pins)
    assert not missing, sorted(missing)


def test_cpu_requirements_use_the_local_cpu_torch_and_no_cuda():
    cpu = pins(ROOT / "requirements" / "cpu.txt")
    assert cpu["torch"] == "2.13.0+cpu"
    assert lock.public(cpu["torch"]) == pins(ROOT / "requirements" / "gpu.txt")["torch"], "CPU and GPU torch differ"
    assert not [name for name in cpu if name.startswith(("nvidia-", "cuda-", "triton"))]
    assert "torchvision" not in cpu, "PyPI's torchvision does not import beside the CPU torch"
    assert cpu["open-clip-torch"] == "3.3.0" and cpu["spandrel"] == pyproject_pin("spandrel", "upscale")


def test_headers_say_how_they_were_made():
    for target in lock.targets(PYPROJECT, ROOT):
        head = target.path.read_text().split("\n", 1)[0]
        assert "make lock" in head and "python -m devtools.lock" in head and "pyproject.toml" in head


def test_lock_check_command_passes():
    done = subprocess.run([sys.executable, "-m", "devtools.lock", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# --- the package ----------------------------------------------------------------------------------


def test_console_script_is_the_cli():
    assert PYPROJECT["project"]["scripts"] == {"punks": "service.cli:main"}
    script = Path(sys.executable).with_name("punks")
    assert script.is_file(), "the package is not installed: pip install --no-deps -e . (make does it)"
    for args in (["--help"], ["generate", "--help"], ["no-such-command"]):
        by_script = subprocess.run([str(script), *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        by_module = subprocess.run(
            [sys.executable, "-m", "service", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert (by_script.returncode, by_script.stdout, by_script.stderr) == (
            by_module.returncode,
            by_module.stdout,
            by_module.stderr,
        )


def test_wheel_of_what_the_dockerfile_copies(tmp_path: Path):
    """Built as the Dockerfile builds it (pyproject.toml + service/ only, no build isolation): the data files are
    in, devtools/ is simply absent, and the console script is declared."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copytree(ROOT / "service", src / "service", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path / "dist"),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("bespoke_punks-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    data = {p.relative_to(ROOT).as_posix() for p in (ROOT / "service").rglob("*") if p.is_file()}
    data = {name for name in data if not name.endswith((".py", ".pyc"))}
    assert "service/py.typed" in data and "service/lora/eval_prompts.txt" in data
    assert "service/sd15_config/tokenizer/vocab.json" in data
    assert data - names == set(), "package data left out of the wheel: [tool.setuptools.package-data]"
    assert not [name for name in names if name.split("/")[0] in DEV_FOLDERS]
    entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    assert "punks = service.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_devtools_is_packaged_but_not_tests_or_bench():
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {"service", "devtools"} <= set(include) and not {"tests", "bench"} & {i.split(".")[0] for i in include}


def top_level_imports(path: Path) -> set[str]:
    """Modules imported at module level (not inside functions, where an optional import may hide)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def test_images_need_no_development_folder():
    """predict.py, trainer.py (the cog image) and service/ (both images) import devtools/tests/bench/train at module
    level nowhere."""
    for path in [ROOT / "predict.py", ROOT / "trainer.py", *(ROOT / "service").rglob("*.py")]:
        assert not top_level_imports(path) & set(DEV_FOLDERS), path.relative_to(ROOT)


# --- the GPU images' build files --------------------------------------------------------------------


def test_cog_yaml():
    import cog

    cog_yaml = yaml.safe_load((ROOT / "cog.yaml").read_text())
    build = cog_yaml["build"]
    assert build["gpu"] is True and build["cuda"] == "13.0"
    assert build["python_version"] == lock.targets(PYPROJECT, ROOT)[0].python == "3.12"
    assert build["python_requirements"] == "requirements/cog.txt"
    assert build["sdk_version"] == cog.__version__ == pyproject_pin("cog", "dev")
    assert cog_yaml["run"] == "predict.py:Runner" and "predict" not in cog_yaml
    assert cog_yaml["train"] == "trainer.py:train"  # not train.py: the train/ package (dev only) would shadow it
    assert "PUNKS_ALLOW_SMOKE_MODEL=false" in cog_yaml["environment"]
    assert "PUNKS_FETCH_AT_SETUP=true" in cog_yaml["environment"]  # a pushed model finds its weights
    # cog 0.23's configuration keys (its config schema, docs/yaml.md); `predict:` is the deprecated name of run
    assert set(cog_yaml) <= {"build", "image", "run", "train", "concurrency", "environment"}
    assert set(build) <= {
        *("cuda", "cudnn", "gpu", "python_version", "python_packages", "pre_install"),
        *("python_requirements", "system_packages", "sdk_version", "run"),
    }
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert set(DEV_FOLDERS) <= set(ignored) and "weights" not in ignored, "cog bakes weights/ in, not dev folders"


def test_dockerfile():
    text = (ROOT / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert instructions[0].startswith("FROM nvidia/cuda:13.0")
    assert "python3.12" in text
    assert "RUN pip install -r requirements/gpu.txt" in instructions
    assert "RUN pip install --no-deps --no-build-isolation . && rm -rf build *.egg-info" in instructions
    copied = [line.split()[1:-1] for line in instructions if line.startswith("COPY ")]
    sources = {source.rstrip("/").split("/")[0] for sources in copied for source in sources}
    assert sources == {"requirements", "pyproject.toml", "service"}, sources
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/(healthz|readyz)", text, re.M)
    assert instructions[-1] in (
        'CMD ["uvicorn", "service.http.app:app", "--host", "0.0.0.0", "--port", "8000"]',
        'CMD ["python", "-m", "service", "serve", "--host", "0.0.0.0", "--port", "8000"]',
    )
    assert "PUNKS_WEIGHTS_DIR=/app/weights" in text
    ignored = (ROOT / "Dockerfile.dockerignore").read_text().split()
    assert "weights" in ignored and set(DEV_FOLDERS) <= set(ignored)


def test_offline_wheels_select_gpu_pins_and_refuse_unknown_names():
    from devtools.offline_wheels import download_command, pins, selected

    pinned = pins()
    assert "torch" in pinned and "diffusers" in pinned
    names, unknown = selected(pinned, ["Diffusers", "fastapi"], [])
    assert names == ["diffusers", "fastapi"] and unknown == []
    names, unknown = selected(pinned, [], ["torch", "not-a-pin"])
    assert "torch" not in names and "diffusers" in names and unknown == ["not-a-pin"]
    command = download_command(pinned, ["diffusers"], Path("wheels"))
    assert command[-1] == f"diffusers=={pinned['diffusers']}" and "--no-deps" in command
