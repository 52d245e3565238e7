"""`python -m service weights check`: what is present, what is missing, and whether each file is what it claims.

Safetensors files are checked from their headers (complete, SD1.5's parameter counts), the tokenizer must have
CLIP's 49,408 tokens, LoRAs are inspected as start-up inspects them, and the files `weights download` recorded
must still have their size (and, with --verify, their sha256). The 2 GB of weights are never loaded, so a check
takes a second; only the optional Real-ESRGAN model is loaded (it needs torch).
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from service.config import CLIP_VOCABULARY_SIZE, MANIFEST_FILE, Settings
from service.errors import WeightsError
from service.lora.inspect import LoraError, check_sd15_lora, inspect_lora
from service.weights.files import WeightFileError, format_size, read_tensor_table, sha256_of
from service.weights.manifest import read_manifest
from service.weights.resolve import folder_variant, model_weights

# Parameters of SD1.5's three models (a ~1% tolerance allows extra buffers such as position_ids).
SD15_PARAMETERS = {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}
PARAMETER_TOLERANCE = 0.01
# The same models' key prefixes in a single-file (LDM) checkpoint.
SINGLE_FILE_PREFIXES = {
    "unet": "model.diffusion_model.",
    "text_encoder": "cond_stage_model.",
    "vae": "first_stage_model.",
}
BASE_CONFIGS = ("model_index.json", "scheduler/scheduler_config.json")
Status = Literal["ok", "warn", "missing", "bad"]


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


def check(settings: Settings, verify: bool = False, expected: Mapping[str, int] = SD15_PARAMETERS) -> list[Finding]:
    """Every finding, required files first; `expected`: parameters per model (the smoke model's in tests)."""
    findings = check_base_model(settings, expected)
    findings.append(check_lora(settings.lora_path(), settings.expected_lora_rank))
    for extra in sorted(settings.loras_path().glob("*.safetensors")):
        findings.append(check_lora(extra, settings.expected_lora_rank, "selectable"))
    findings.append(check_upscaler(settings))
    return findings + check_manifest(settings, verify)


def check_base_model(settings: Settings, expected: Mapping[str, int] = SD15_PARAMETERS) -> list[Finding]:
    path = next((p for p in settings.base_model_candidates() if p.exists()), None)
    if path is None:
        shown = " or ".join(str(p) for p in settings.base_model_candidates())
        return [Finding("missing", "base model", Path(shown), "run `python -m service weights download`")]
    if path.is_dir():
        return _check_folder(path, expected)
    if path.suffix == ".safetensors":
        return [_check_safetensors("base model", path, expected, SINGLE_FILE_PREFIXES)]
    size = format_size(path.stat().st_size)
    return [Finding("warn", "base model", path, f"{size}, not a .safetensors: not inspected")]


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
    return Finding("ok", "realesrgan", path, f"{format_size(path.stat().st_size)}, {upscaler.describe()}", required)


def check_manifest(settings: Settings, verify: bool = False) -> list[Finding]:
    """Files recorded by `weights download` that changed since (size; sha256 with verify)."""
    findings = []
    for entry in read_manifest(settings.weights_dir).values():
        path = entry.file(settings.weights_dir)
        if not path.is_file():
            continue  # reported by the checks above when it matters
        if path.stat().st_size != entry.size:
            detail = f"{path.stat().st_size} bytes, the manifest says {entry.size} (from {entry.source})"
            findings.append(Finding("bad", entry.what, path, detail))
        elif verify and sha256_of(path) != entry.sha256:
            findings.append(Finding("bad", entry.what, path, f"sha256 differs from the manifest's {entry.sha256}"))
    if verify and not findings:
        manifest = settings.weights_dir / MANIFEST_FILE
        findings.append(Finding("ok", "manifest", manifest, "every recorded file's sha256 matches"))
    return findings


def _check_folder(folder: Path, expected: Mapping[str, int]) -> list[Finding]:
    findings = []
    for name in BASE_CONFIGS:
        path = folder / name
        try:
            json.loads(path.read_text())
            findings.append(Finding("ok", "base config", path))
        except FileNotFoundError:
            findings.append(Finding("missing", "base config", path))
        except (OSError, ValueError) as error:
            findings.append(Finding("bad", "base config", path, f"not JSON: {error}"))
    findings.append(_check_tokenizer(folder))
    variant = folder_variant(folder)
    for model, parameters in expected.items():
        if not (folder / model / "config.json").is_file():
            findings.append(Finding("missing", model, folder / model / "config.json"))
        weights = model_weights(folder / model, variant)
        if weights is None:
            findings.append(Finding("missing", model, folder / model, "no weight file (*.safetensors)"))
        elif weights.suffix != ".safetensors":
            size = format_size(weights.stat().st_size)
            findings.append(Finding("warn", model, weights, f"{size}, pickle: not inspected"))
        else:
            findings.append(_check_safetensors(model, weights, {model: parameters}, prefixes={model: ""}))
    return findings


def _check_tokenizer(folder: Path) -> Finding:
    tokenizer = folder / "tokenizer"
    try:
        if (tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file():
            vocabulary = len(json.loads((tokenizer / "vocab.json").read_text()))
            lines = (tokenizer / "merges.txt").read_text().splitlines()
            merges = sum(1 for line in lines if line and not line.startswith("#"))
        elif (tokenizer / "tokenizer.json").is_file():
            model = json.loads((tokenizer / "tokenizer.json").read_text())["model"]
            vocabulary, merges = len(model["vocab"]), len(model.get("merges") or ())
        else:
            return Finding("missing", "tokenizer", tokenizer, "no vocab.json + merges.txt (or tokenizer.json)")
    except (OSError, ValueError, KeyError, TypeError) as error:
        return Finding("bad", "tokenizer", tokenizer, f"unreadable: {error}")
    if vocabulary != CLIP_VOCABULARY_SIZE or not merges:
        return Finding(
            "bad",
            "tokenizer",
            tokenizer,
            f"{vocabulary} tokens and {merges} merges; SD1.5's CLIP tokenizer has {CLIP_VOCABULARY_SIZE}",
        )
    return Finding("ok", "tokenizer", tokenizer, f"{vocabulary} tokens, {merges} merges")


def _check_safetensors(what: str, path: Path, expected: Mapping[str, int], prefixes: Mapping[str, str]) -> Finding:
    """Complete, and with each model's parameter count (the tensors under prefixes[model]) as expected."""
    try:
        table = read_tensor_table(path)
    except WeightFileError as error:
        return Finding("bad", what, path, str(error))
    counts = {
        model: sum(spec.values for name, spec in table.tensors.items() if name.startswith(prefixes[model]))
        for model in expected
    }
    problems = [
        f"{model} has {counts[model] / 1e6:.1f}M parameters, SD1.5's has {count / 1e6:.1f}M: not SD1.5 (or incomplete)"
        for model, count in expected.items()
        if abs(counts[model] - count) > count * PARAMETER_TOLERANCE
    ]
    if problems:
        return Finding("bad", what, path, "; ".join(problems))
    summary = f"{format_size(path.stat().st_size)}, {'/'.join(sorted(table.dtypes))}"
    return Finding("ok", what, path, f"{summary}, {sum(counts.values()) / 1e6:.1f}M parameters")
