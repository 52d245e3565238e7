"""The README and docs/ pages: every shell and curl example runs here or is skipped by name with the reason; the
README stays short and links every page.

Examples are the commands of the ```bash / ```sh / ```shell blocks. Each must match one rule of RULES: a rule
either runs the command (curl against a live server on 127.0.0.1 with the smoke model, the CLI in a scratch folder,
a script in the checkout) or skips it with a reason (it needs a Docker engine, a GPU, the network, or minutes).
A new example that matches no rule fails, so none goes untested without a reason written here.
"""

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "train" / "README.md"]
README_MAX_LINES = 200
# Linked from the README, generated from the settings class by devtools/config_doc.py (its own test checks it).
GENERATED_PAGES = {"docs/configuration.md"}
FENCE = re.compile(r"^```(\w*)\s*$")
SHELL_LANGUAGES = {"bash", "sh", "shell"}
TIMEOUT_S = 300


@dataclass(frozen=True)
class Example:
    page: str
    line: int
    command: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def strip_comment(line: str) -> str:
    """A line without its trailing `# comment` (a '#' after whitespace, outside quotes)."""
    quote = ""
    for index, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip()
    return line.rstrip()


def shell_examples(page: Path) -> list[Example]:
    examples, language, pending, start = [], None, "", 0
    for number, line in enumerate(page.read_text().splitlines(), 1):
        fence = FENCE.match(line)
        if fence:
            language = None if language is not None else fence[1]
            continue
        if language not in SHELL_LANGUAGES:
            continue
        text = strip_comment(line)
        if not text.strip():
            continue
        if not pending:
            start = number
        if text.endswith("\\"):
            pending += text[:-1].strip() + " "
            continue
        examples.append(Example(str(page.relative_to(ROOT)), start, (pending + text.strip()).strip()))
        pending = ""
    return examples


EXAMPLES = [example for page in PAGES for example in shell_examples(page)]

# What the live server and the scratch folder stand in for.
LOCAL_URL = re.compile(r"http://(localhost|127\.0\.0\.1):8000")
PYTHON = re.compile(r"^(\.venv/bin/python|python3?)\b")
ENV_PREFIX = r"^(?:[A-Z_]+=\S+\s+)*"


@dataclass(frozen=True)
class Rule:
    pattern: str
    run: str = ""  # "curl", "cli" (scratch folder), "repo" (in the checkout); empty: skipped
    reason: str = ""  # why it is skipped
    exit_codes: tuple[int, ...] = (0,)

    def matches(self, command: str) -> bool:
        return re.search(self.pattern, command) is not None


NO_DOCKER = "needs a Docker engine and a GPU"
NO_GPU = "needs a CUDA GPU"
NO_NETWORK = "needs the network"
RULES = [
    # Run here.
    Rule(r"^curl\b", run="curl"),
    Rule(r"^python -m service generate .*--upscaler realesrgan", reason="needs the Real-ESRGAN weights"),
    Rule(r"^python -m service generate ", run="cli"),
    Rule(r"^python -m service weights check", run="cli", exit_codes=(0, 1)),  # 1: incomplete, as documented
    Rule(r"^python -m service lora inspect weights/", run="cli"),
    Rule(r"^python -m devtools\.smoke ", run="cli"),
    Rule(r"^python -m bench\.readme_table bench/results/", run="repo"),
    # Skipped, with the reason.
    Rule(r"^python -m service serve\b", reason="runs until stopped; the live server of the curl examples is this app"),
    Rule(r"^make (demo|test)$", reason="the Makefile's targets: `make test` runs this test; demo installs the venv"),
    Rule(r"^sudo apt-get|^apt-get", reason="installs system packages"),
    Rule(r"^docker ", reason=NO_DOCKER),
    Rule(r"^cog ", reason="needs Cog, a Docker engine and a GPU (tests/test_predict.py runs predict.py in Cog)"),
    Rule(ENV_PREFIX + r"serve (run|deploy) ", reason="needs Ray Serve and GPUs (tests/test_http_ray.py runs the app)"),
    Rule(r"^pip install ", reason=NO_NETWORK),
    Rule(r"^helm |^kubectl ", reason="needs a Kubernetes cluster"),
    Rule(r"^python -m service weights download", reason=NO_NETWORK),
    Rule(r"^python -m service lora diff ", reason="example file names (tests/test_lora_tools.py runs lora diff)"),
    Rule(r"^python -m service evaluate ", reason="renders a contact sheet of many images (tests/test_lora_tools.py)"),
    Rule(r"^python -m service compile-cache", reason=NO_GPU),
    Rule(r"^python -m service train ", reason="trains for minutes (tests/test_training.py runs a short training)"),
    Rule(r"^python -m bench\.bench .*--smoke", reason="a benchmark: minutes on a CPU"),
    Rule(ENV_PREFIX + r"python -m bench\.(bench|cog_bench|ray_load|fp8|unet_kernels|train_gpu) ", reason=NO_GPU),
    Rule(r"bench\.snap_quality ", reason="a benchmark: minutes on a CPU (tests/test_pixelart.py asserts its goals)"),
    Rule(r"^python -m train\.(run|assemble) ", reason="trains the demo model (tests/test_train.py runs a short one)"),
]


def rule_for(command: str) -> Rule | None:
    return next((rule for rule in RULES if rule.matches(command)), None)


def test_examples_are_found():
    assert len(EXAMPLES) > 20
    assert any(example.command.startswith("curl") for example in EXAMPLES)


@pytest.mark.parametrize("example", EXAMPLES, ids=[example.id for example in EXAMPLES])
def test_every_example_has_a_rule(example: Example):
    assert rule_for(example.command), (
        f"{example.id}: `{example.command}` matches no rule in tests/test_docs.py: run it or skip it with a reason"
    )


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory, smoke_dir: Path) -> Path:
    """A scratch working folder whose weights/ holds the smoke model (for `lora inspect weights/...`)."""
    folder = tmp_path_factory.mktemp("docs-examples")
    (folder / "weights").symlink_to(smoke_dir)
    return folder


@pytest.mark.parametrize("example", EXAMPLES, ids=[example.id for example in EXAMPLES])
def test_example_runs(example: Example, request: pytest.FixtureRequest):
    rule = rule_for(example.command)
    assert rule is not None, f"{example.id}: no rule (see test_every_example_has_a_rule)"
    if not rule.run:
        pytest.skip(rule.reason)
    smoke_env: dict[str, str] = request.getfixturevalue("smoke_env")
    scratch: Path = request.getfixturevalue("scratch")
    env = smoke_env | {"PYTHONPATH": str(ROOT), "PUNKS_WARMUP": "false", "PUNKS_STEPS": "1"}
    env |= {"PUNKS_GENERATION_SIZE": "256", "PUNKS_ALLOW_SMOKE_MODEL": "true"}
    command, cwd = example.command, scratch
    if rule.run == "curl":
        url = request.getfixturevalue("live")
        command = "curl --fail-with-body " + LOCAL_URL.sub(url, command.removeprefix("curl "))
    else:
        command = PYTHON.sub(shlex.quote(sys.executable), command)
        cwd = ROOT if rule.run == "repo" else scratch
    result = subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    output = f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert result.returncode in rule.exit_codes, (
        f"{example.id}: `{example.command}` exited {result.returncode}\n{output}"
    )
    for target in re.findall(r"(?:-o|--output) (\S+)\.png", command):  # several images: NAME-0.png, NAME-1.png, ...
        written = [cwd / f"{target}.png"] if (cwd / f"{target}.png").exists() else sorted(cwd.glob(f"{target}-*.png"))
        assert written, f"{example.id}: wrote no {target}.png"
        for path in written:
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{example.id}: {path.name} is not a PNG"


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def relative_links(page: Path) -> list[str]:
    text = page.read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    return [target for target in targets if not re.match(r"[a-z]+://", target)]


def test_every_docs_page_is_linked_from_the_readme():
    linked = {str((ROOT / target).resolve().relative_to(ROOT)) for target in relative_links(README)}
    pages = {str(page.relative_to(ROOT)) for page in (ROOT / "docs").glob("*.md")} | GENERATED_PAGES
    assert pages - linked == set(), "docs pages the README does not link"


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_relative_links_resolve(page: Path):
    for target in relative_links(page):
        path = (page.parent / target).resolve()
        if str(path.relative_to(ROOT)) in GENERATED_PAGES:
            continue
        assert path.exists(), f"{page.relative_to(ROOT)} links {target}, which does not exist"


def test_no_example_leaves_the_checkout():
    """Examples use paths inside the checkout or plain placeholders, nothing of one particular machine."""
    for example in EXAMPLES:
        assert not re.search(r"(^|\s)(/(work|root)/|\.\./)", example.command), example.id


if __name__ == "__main__":  # print each example and what happens to it
    for example in EXAMPLES:
        rule = rule_for(example.command)
        verdict = "NO RULE" if rule is None else (f"run ({rule.run})" if rule.run else f"skip: {rule.reason}")
        print(f"{example.id}: {verdict}\n    {example.command}")
    os._exit(0)
