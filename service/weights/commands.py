"""`python -m service weights download|check`: fill weights/ and say whether what is there is right.

download: SD1.5 in diffusers layout from the Hugging Face Hub, fp16 safetensors only (huggingface_hub
resumes, shows progress and fetches files in parallel); the LoRA and the optional Real-ESRGAN model
from https URLs (service/fetch.py) or hub paths `hf://owner/repo[@revision]/path/file`, either with
an optional `#sha256=<hex>`. Each run records what it wrote in weights/manifest.json.

check: what is present, what is missing, and whether each file is what it claims (safetensors
headers complete, parameter counts of SD1.5, a 49,408-token tokenizer, the LoRA inspected). It never
loads the 2 GB of weights, so it is quick; `--verify` re-hashes files against the manifest.
"""

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from service.config import Settings
from service.errors import WeightsError
from service.weights.fetch import FetchError, WeightFile, fetch_weights, redact, sha256_of, split_sha256
from service.lora.inspect import LoraError, check_sd15_lora, inspect_lora, read_safetensors_header

SD15_FOLDER = "stable-diffusion-v1-5"
MANIFEST = "manifest.json"
CLIP_VOCABULARY_SIZE = 49408
# What `weights download` takes from the diffusers repo: configs, the tokenizer and the fp16 weights of the three
# models the service runs. Not the .bin / full-precision / EMA duplicates, nor the safety checker.
SD15_PATTERNS = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
)
# Parameters of SD1.5's three models (a ~1% tolerance allows extra buffers such as position_ids).
SD15_PARAMETERS = {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}
# The same models' key prefixes in a single-file (LDM) checkpoint.
SINGLE_FILE_PREFIXES = {"unet": "model.diffusion_model.", "text_encoder": "cond_stage_model.", "vae": "first_stage_model."}
Status = Literal["ok", "warn", "missing", "bad"]


@dataclass(frozen=True)
class Source:
    """Where one file comes from: an http(s) URL or a hub path, with an optional pinned sha256."""

    location: str
    sha256: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Source":
        location, sha256 = split_sha256(text.strip(), context=redact(text.strip().partition("#")[0]))
        if location.startswith("hf://"):
            hub_path(location)  # validates
        elif not location.startswith(("http://", "https://")):
            raise ValueError(f"expected an https:// URL or hf://owner/repo/path, got {redact(location)!r}")
        return cls(location, sha256)

    @property
    def shown(self) -> str:
        return self.location if self.location.startswith("hf://") else redact(self.location)


def hub_path(location: str) -> tuple[str, str | None, str]:
    """hf://owner/repo[@revision]/path/file -> (repo id, revision, path in the repo)."""
    parts = location.removeprefix("hf://").split("/", 2)
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"{location}: expected hf://owner/repo/path/to/file")
    owner, repo, filename = parts
    repo, _, revision = repo.partition("@")
    return f"{owner}/{repo}", revision or None, filename


@dataclass(frozen=True)
class ManifestEntry:
    what: str
    path: str  # relative to the weights folder when inside it
    source: str
    size: int
    sha256: str


def _relative(path: Path, weights_dir: Path) -> str:
    return str(path.relative_to(weights_dir)) if path.is_relative_to(weights_dir) else str(path.resolve())


def read_manifest(weights_dir: Path) -> dict[str, ManifestEntry]:
    path = weights_dir / MANIFEST
    if not path.is_file():
        return {}
    return {entry["path"]: ManifestEntry(**entry) for entry in json.loads(path.read_text())["files"]}


def write_manifest(weights_dir: Path, entries: list[ManifestEntry]) -> Path:
    """Merge entries into weights/manifest.json (by path) and write it atomically."""
    merged = read_manifest(weights_dir) | {entry.path: entry for entry in entries}
    path = weights_dir / MANIFEST
    weights_dir.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    files = [asdict(entry) for _, entry in sorted(merged.items())]
    temporary.write_text(json.dumps({"version": 1, "files": files}, indent=2) + "\n")
    os.replace(temporary, path)
    return path


def _entry(what: str, path: Path, weights_dir: Path, source: str, sha256: str | None = None) -> ManifestEntry:
    return ManifestEntry(what, _relative(path, weights_dir), source, path.stat().st_size, sha256 or sha256_of(path))


# --- download -----------------------------------------------------------------------------------------------


def download_base_model(settings: Settings, revision: str | None = None) -> list[ManifestEntry]:
    """SD1.5's fp16 diffusers files into weights/stable-diffusion-v1-5 (or PUNKS_BASE_MODEL, a folder)."""
    from huggingface_hub import snapshot_download

    folder = settings.base_model if settings.base_model is not None else settings.weights_dir / SD15_FOLDER
    if folder.suffix in (".safetensors", ".ckpt"):
        raise ValueError(f"PUNKS_BASE_MODEL={folder} is a single file; `weights download` fetches a diffusers folder")
    repo = settings.base_model_repo
    try:
        snapshot_download(repo, revision=revision, allow_patterns=list(SD15_PATTERNS), local_dir=folder)
    except OSError as error:  # the hub's HTTP and connection errors are OSErrors
        raise FetchError(f"SD1.5 from the Hugging Face Hub ({repo}) failed: {error}") from None
    files = sorted(f for f in folder.rglob("*") if f.is_file() and ".cache" not in f.relative_to(folder).parts)
    at = f"@{revision}" if revision else ""
    return [
        _entry("base model", f, settings.weights_dir, f"hf://{repo}{at}/{f.relative_to(folder).as_posix()}")
        for f in files
    ]


def download_file(what: str, source: Source, target: Path, weights_dir: Path) -> ManifestEntry:
    """One file from a URL (service/fetch.py: .part, resume, checksum) or the hub; FetchError names it."""
    if not source.location.startswith("hf://"):
        (path,) = fetch_weights([WeightFile(_relative(target, weights_dir), source.location, source.sha256)], weights_dir)
        return _entry(what, path, weights_dir, source.shown, source.sha256)
    if target.is_file() and (source.sha256 is None or sha256_of(target) == source.sha256):
        return _entry(what, target, weights_dir, source.shown, source.sha256)
    from huggingface_hub import hf_hub_download

    repo, revision, filename = hub_path(source.location)
    try:  # into a staging folder (the hub's own resume state lives there), then renamed into place
        downloaded = Path(hf_hub_download(repo, filename, revision=revision, local_dir=weights_dir / ".hub-download"))
    except OSError as error:
        raise FetchError(f"{target.name}: download of {source.shown} failed: {error}") from None
    actual = sha256_of(downloaded)
    if source.sha256 is not None and actual != source.sha256:
        downloaded.unlink()
        raise FetchError(
            f"{target.name}: checksum mismatch for {source.shown}: expected sha256 {source.sha256}, got {actual}; "
            "the download was removed"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(downloaded, target)
    return _entry(what, target, weights_dir, source.shown, actual)


def download(
    settings: Settings, *, base: bool = True, revision: str | None = None,
    lora: str | None = None, realesrgan: str | None = None,
) -> list[ManifestEntry]:
    """Everything asked for (lora/realesrgan default to the settings); the manifest is written even when a
    later file fails, so what did arrive is recorded."""
    started = time.monotonic()
    lora = lora or settings.lora_url
    if realesrgan is None and settings.upscaler == "realesrgan":
        realesrgan = settings.realesrgan_url
    jobs = [("lora", lora, settings.lora_path()), ("realesrgan", realesrgan, settings.realesrgan_path())]
    sources = [(what, Source.parse(text), target) for what, text, target in jobs if text]  # fail before downloading
    entries: list[ManifestEntry] = []
    try:
        if base:
            entries += download_base_model(settings, revision)
        for what, source, target in sources:
            entries.append(download_file(what, source, target, settings.weights_dir))
    finally:
        if entries:
            write_manifest(settings.weights_dir, entries)
    print(f"{len(entries)} files ready in {settings.weights_dir} ({time.monotonic() - started:.0f}s); "
          f"manifest: {settings.weights_dir / MANIFEST}")
    if not lora:
        print("note: no LoRA source given (--lora URL or PUNKS_LORA_URL): the LoRA was not downloaded")
    return entries


# --- check --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    status: Status
    what: str
    path: Path
    detail: str = ""
    required: bool = True

    @property
    def fails(self) -> bool:
        return self.required and self.status in ("missing", "bad")

    def line(self) -> str:
        label = self.status.upper() if self.status != "ok" else "ok"
        optional = "" if self.required or self.status == "ok" else " (optional)"
        return f"{label:8} {self.what:13} {self.path}{optional}" + (f": {self.detail}" if self.detail else "")


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _tensors(path: Path) -> tuple[dict, str]:
    """The safetensors header's tensors, after checking the file holds all the data it promises."""
    header, data_start = read_safetensors_header(path)
    header.pop("__metadata__", None)
    size = path.stat().st_size
    data_end = data_start + max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if data_end != size:
        raise LoraError(f"truncated or padded: header promises {data_end} bytes, the file has {size}")
    dtypes = "/".join(sorted({entry["dtype"] for entry in header.values()}))
    return header, f"{_size(size)}, {dtypes}"


def _parameters(tensors: dict, prefix: str = "") -> int:
    return sum(math.prod(entry["shape"]) for name, entry in tensors.items() if name.startswith(prefix))


def _count_check(name: str, count: int, expected: int) -> str | None:
    if abs(count - expected) > expected * 0.01:
        return f"{name} has {count / 1e6:.1f}M parameters, SD1.5's has {expected / 1e6:.1f}M: not SD1.5 (or incomplete)"
    return None


def _model_weights(folder: Path) -> Path | None:
    """The weight file the loader uses: full precision when present, else the fp16 variant."""
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    plain = [f for f in files if f.name.split(".")[-2] != "fp16"]
    return (plain or files or [None])[0]


def _check_tokenizer(folder: Path) -> Finding:
    tokenizer = folder / "tokenizer"
    try:
        if (tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file():
            vocabulary = len(json.loads((tokenizer / "vocab.json").read_text()))
            merges = sum(1 for line in (tokenizer / "merges.txt").read_text().splitlines() if line and not line.startswith("#"))
        elif (tokenizer / "tokenizer.json").is_file():
            model = json.loads((tokenizer / "tokenizer.json").read_text())["model"]
            vocabulary, merges = len(model["vocab"]), len(model.get("merges") or ())
        else:
            return Finding("missing", "tokenizer", tokenizer, "no vocab.json + merges.txt (or tokenizer.json)")
    except (OSError, ValueError, KeyError, TypeError) as error:
        return Finding("bad", "tokenizer", tokenizer, f"unreadable: {error}")
    if vocabulary != CLIP_VOCABULARY_SIZE or not merges:
        return Finding("bad", "tokenizer", tokenizer,
                       f"{vocabulary} tokens and {merges} merges; SD1.5's CLIP tokenizer has {CLIP_VOCABULARY_SIZE}")
    return Finding("ok", "tokenizer", tokenizer, f"{vocabulary} tokens, {merges} merges")


def _check_folder(folder: Path, expected: Mapping[str, int]) -> list[Finding]:
    findings = []
    for name in ("model_index.json", "scheduler/scheduler_config.json"):
        path = folder / name
        try:
            json.loads(path.read_text())
            findings.append(Finding("ok", "base config", path))
        except FileNotFoundError:
            findings.append(Finding("missing", "base config", path))
        except (OSError, ValueError) as error:
            findings.append(Finding("bad", "base config", path, f"not JSON: {error}"))
    findings.append(_check_tokenizer(folder))
    for model, parameters in expected.items():
        if not (folder / model / "config.json").is_file():
            findings.append(Finding("missing", model, folder / model / "config.json"))
        weights = _model_weights(folder / model)
        if weights is None:
            findings.append(Finding("missing", model, folder / model, "no weight file (*.safetensors)"))
        elif weights.suffix != ".safetensors":
            findings.append(Finding("warn", model, weights, f"{_size(weights.stat().st_size)}, pickle: not inspected"))
        else:
            findings.append(_check_safetensors(model, weights, {model: parameters}, prefixes={model: ""}))
    return findings


def _check_safetensors(what: str, path: Path, expected: Mapping[str, int], prefixes: Mapping[str, str]) -> Finding:
    try:
        tensors, summary = _tensors(path)
    except LoraError as error:
        return Finding("bad", what, path, str(error).removeprefix(f"{path}: "))
    problems = [_count_check(name, _parameters(tensors, prefixes[name]), count) for name, count in expected.items()]
    problems = [p for p in problems if p]
    if problems:
        return Finding("bad", what, path, "; ".join(problems))
    total = sum(_parameters(tensors, prefixes[name]) for name in expected)
    return Finding("ok", what, path, f"{summary}, {total / 1e6:.1f}M parameters")


def check_base_model(settings: Settings, expected: Mapping[str, int] = SD15_PARAMETERS) -> list[Finding]:
    path = next((p for p in settings.base_model_candidates() if p.exists()), None)
    if path is None:
        shown = " or ".join(str(p) for p in settings.base_model_candidates())
        return [Finding("missing", "base model", Path(shown), "run `python -m service weights download`")]
    if path.is_dir():
        return _check_folder(path, expected)
    if path.suffix == ".safetensors":
        return [_check_safetensors("base model", path, expected, SINGLE_FILE_PREFIXES)]
    return [Finding("warn", "base model", path, f"{_size(path.stat().st_size)}, not a .safetensors: not inspected")]


def check_lora(path: Path, expected_rank: int, what: str = "lora", required: bool = True) -> Finding:
    if not path.is_file():
        hint = "run `python -m service weights download --lora URL` (or set PUNKS_LORA_URL)"
        return Finding("missing", what, path, hint, required)
    try:
        info = inspect_lora(path)
        warnings = check_sd15_lora(info, expected_rank)
    except LoraError as error:
        return Finding("bad", what, path, str(error).removeprefix(f"{path}: ").removeprefix(f"{path} "), required)
    return Finding("warn" if warnings else "ok", what, path, "; ".join([info.describe(), *warnings]), required)


def check_upscaler(settings: Settings) -> Finding:
    path, required = settings.realesrgan_path(), settings.upscaler == "realesrgan"
    if not path.is_file():
        detail = "PUNKS_UPSCALER=realesrgan needs it: `python -m service weights download --realesrgan`"
        return Finding("missing", "realesrgan", path, detail if required else "", required)
    from service.upscale import load_upscaler  # torch: only when checking the upscaler

    try:
        upscaler = load_upscaler(path)
    except WeightsError as error:
        return Finding("bad", "realesrgan", path, str(error).removeprefix(f"{path}: "), required)
    return Finding("ok", "realesrgan", path, f"{_size(path.stat().st_size)}, {upscaler.describe()}", required)


def check_manifest(settings: Settings, verify: bool = False) -> list[Finding]:
    """Files recorded by `weights download` that changed since (size; sha256 with verify)."""
    findings = []
    for entry in read_manifest(settings.weights_dir).values():
        path = Path(entry.path) if Path(entry.path).is_absolute() else settings.weights_dir / entry.path
        if not path.is_file():
            continue  # reported by the checks above when it matters
        if path.stat().st_size != entry.size:
            findings.append(Finding("bad", entry.what, path,
                                    f"{path.stat().st_size} bytes, the manifest says {entry.size} (from {entry.source})"))
        elif verify and sha256_of(path) != entry.sha256:
            findings.append(Finding("bad", entry.what, path, f"sha256 differs from the manifest's {entry.sha256}"))
    if verify and not findings:
        findings.append(Finding("ok", "manifest", settings.weights_dir / MANIFEST, "every recorded file's sha256 matches"))
    return findings


def check(settings: Settings, verify: bool = False, expected: Mapping[str, int] = SD15_PARAMETERS) -> list[Finding]:
    findings = check_base_model(settings, expected)
    findings.append(check_lora(settings.lora_path(), settings.expected_lora_rank))
    for extra in sorted(settings.loras_path().glob("*.safetensors")):
        findings.append(check_lora(extra, settings.expected_lora_rank, "selectable"))
    findings.append(check_upscaler(settings))
    return findings + check_manifest(settings, verify)


# --- command line -------------------------------------------------------------------------------------------


def add_commands(commands) -> None:
    """`weights download [...]` and `weights check [--verify]` under the main parser."""
    weights = commands.add_parser("weights", help="download the weights into weights/, or check what is there")
    actions = weights.add_subparsers(dest="weights_command", required=True)
    get = actions.add_parser("download", help="SD1.5 (fp16, from the Hugging Face Hub), the LoRA, optionally Real-ESRGAN")
    get.add_argument("--lora", metavar="SOURCE", help="https://... or hf://owner/repo/path[#sha256=hex] "
                     "(default PUNKS_LORA_URL)")
    get.add_argument("--realesrgan", metavar="SOURCE", nargs="?", const="",
                     help="also the upscaler; without SOURCE: PUNKS_REALESRGAN_URL (RealESRGAN_x2plus.pth from its "
                     "GitHub release). Implied by PUNKS_UPSCALER=realesrgan")
    get.add_argument("--repo", help="SD1.5 diffusers repo on the hub (default PUNKS_BASE_MODEL_REPO)")
    get.add_argument("--revision", help="branch, tag or commit of that repo (default: main)")
    get.add_argument("--no-base", dest="base", action="store_false", help="skip SD1.5 (only the LoRA / upscaler)")
    get.set_defaults(run=_run_download)
    inspect = actions.add_parser("check", help="what is present, missing or wrong (exit 1 when a required file is)")
    inspect.add_argument("--verify", action="store_true", help="also re-hash files against weights/manifest.json")
    inspect.set_defaults(run=_run_check)


def _run_download(args) -> int:
    settings = Settings()
    if args.repo:
        settings = settings.model_copy(update={"base_model_repo": args.repo})
    realesrgan = (args.realesrgan or settings.realesrgan_url) if args.realesrgan is not None else None
    try:
        download(settings, base=args.base, revision=args.revision, lora=args.lora, realesrgan=realesrgan)
    except FetchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return _run_check(args)


def _run_check(args) -> int:
    findings = check(Settings(), verify=getattr(args, "verify", False))
    for finding in findings:
        print(finding.line())
    failed = [f for f in findings if f.fails]
    print(f"{len(failed)} required file(s) missing or wrong" if failed else "all required weights present and sane")
    return 1 if failed else 0
