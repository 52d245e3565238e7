"""weights/manifest.json: what `weights download` wrote (path, source, size, sha256), so that `weights check` can
tell a file that changed since (a size at once, a checksum with --verify) from one that arrived intact."""

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from service.config import MANIFEST_FILE
from service.weights.files import sha256_of

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class ManifestEntry:
    what: str  # base model, lora, realesrgan
    path: str  # relative to the weights folder when inside it
    source: str  # as Source.shown: never a signed URL's secrets
    size: int
    sha256: str

    def file(self, weights_dir: Path) -> Path:
        return weights_dir / self.path  # an absolute path stays as it is


def manifest_entry(what: str, path: Path, weights_dir: Path, source: str, sha256: str | None = None) -> ManifestEntry:
    """The entry of a file that is in place; its sha256 is computed unless the download already checked it."""
    return ManifestEntry(what, relative_path(path, weights_dir), source, path.stat().st_size, sha256 or sha256_of(path))


def relative_path(path: Path, weights_dir: Path) -> str:
    """path relative to the weights folder, or absolute when it lies elsewhere (PUNKS_LORA=/elsewhere/x)."""
    return str(path.relative_to(weights_dir)) if path.is_relative_to(weights_dir) else str(path.resolve())


def read_manifest(weights_dir: Path) -> dict[str, ManifestEntry]:
    """Entries by path; {} when there is no manifest yet."""
    path = weights_dir / MANIFEST_FILE
    if not path.is_file():
        return {}
    return {entry["path"]: ManifestEntry(**entry) for entry in json.loads(path.read_text())["files"]}


def write_manifest(weights_dir: Path, entries: list[ManifestEntry]) -> Path:
    """Merge entries into the manifest (by path) and write it atomically."""
    merged = read_manifest(weights_dir) | {entry.path: entry for entry in entries}
    path = weights_dir / MANIFEST_FILE
    weights_dir.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    files = [asdict(entry) for _, entry in sorted(merged.items())]
    temporary.write_text(json.dumps({"version": MANIFEST_VERSION, "files": files}, indent=2) + "\n")
    os.replace(temporary, path)
    return path
