"""Put weight files into the weights folder from their sources (service/weights/source.py: https URLs or
hf:// hub paths, optionally pinned with #sha256=<hex>). Used by `weights download` and, for containers that do
not have the weights baked in, by Cog's setup through PUNKS_WEIGHTS_URLS.

PUNKS_WEIGHTS_URLS lists "dest=source" pairs, separated by commas or whitespace; dest is relative to the weights
folder (PUNKS_WEIGHTS_DIR) and may hold subfolders:

    PUNKS_WEIGHTS_URLS="v1-5-pruned-emaonly.safetensors=https://example.com/sd15.safetensors#sha256=6ce0...
                        bespoke_punks.safetensors=hf://owner/punks@v1/bespoke_punks.safetensors#sha256=94b2..."

Files are downloaded in parallel into "<dest>.part", under the download policy for the operator's own URLs
(service/weights/policy.py: timeouts, a rate floor and a size cap; internal hosts and http allowed), and renamed
into place only when complete and, with a checksum, verified (a mismatch removes the file). A file that is already
there is kept when its checksum matches, or when no checksum was given. A download that broke off leaves its
".part" behind when the checksum is pinned, and the next run resumes it with an HTTP Range request (without a
pin, a file that changed at the URL could be spliced unnoticed, so it starts over). An hf:// file is fetched from
the hub's resolve URL the same way (with HF_TOKEN when set). Commas and spaces inside a URL must be
percent-encoded (%2C, %20). Query strings (signed URLs) never appear in the logs.

    python -m service.weights.fetch            # download what PUNKS_WEIGHTS_URLS lists, e.g. before `cog push`
"""

import hashlib
import logging
import os
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from service.config import DownloadSettings
from service.weights.files import format_size, sha256_of
from service.weights.policy import DownloadCancelled, DownloadError, DownloadPolicy, DownloadStatusError, stream
from service.weights.source import Source, redact

__all__ = ["FetchError", "WeightFile", "fetch_listed_weights", "fetch_one", "fetch_weights", "parse_spec", "redact"]
log = logging.getLogger(__name__)

ENV_VAR = "PUNKS_WEIGHTS_URLS"
PROGRESS_EVERY_S = 5.0


class FetchError(RuntimeError):
    """A weights download failed; the message names the file, its (redacted) source and why."""


@dataclass(frozen=True)
class WeightFile:
    """One file to put at `dest` in the weights folder, from `url` (any location Source takes: https or hf://)."""

    dest: str  # relative POSIX path inside the weights folder
    url: str
    sha256: str | None = None

    @classmethod
    def of(cls, dest: str, source: Source) -> "WeightFile":
        return cls(dest, source.location, source.sha256)

    @property
    def source(self) -> Source:
        return Source(self.url, self.sha256)

    @property
    def shown_url(self) -> str:
        return self.source.shown


def parse_spec(spec: str) -> list[WeightFile]:
    """Parse PUNKS_WEIGHTS_URLS ("dest=source ..."); ValueError naming the bad entry."""
    files: list[WeightFile] = []
    for entry in filter(None, re.split(r"[,\s]+", spec.strip())):
        dest, sep, text = entry.partition("=")
        if not sep or not dest or not text:
            raise ValueError(f"{ENV_VAR}: expected dest=url (or dest=hf://owner/repo/path), got {entry!r}")
        source = Source.parse(text, context=f"{ENV_VAR}: {dest}")
        path = PurePosixPath(dest)
        if path.is_absolute() or ".." in path.parts or dest.startswith("~"):
            raise ValueError(f"{ENV_VAR}: {dest}: must be a path inside the weights folder")
        if any(f.dest == str(path) for f in files):
            raise ValueError(f"{ENV_VAR}: {dest} is listed twice")
        files.append(WeightFile.of(str(path), source))
    return files


def _download(
    file: WeightFile,
    target: Path,
    policy: DownloadPolicy,
    cancel: threading.Event | None,
    token: str | None = None,
) -> str:
    """Stream the URL into target.part (resuming a pinned partial one) with progress logs; return its sha256."""
    part = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    resumable = file.sha256 is not None
    offset = part.stat().st_size if resumable and part.is_file() else 0
    headers = _hub_headers(file, policy, token) | ({"Range": f"bytes={offset}-"} if offset else {})
    digest, done = hashlib.sha256(), 0  # hashed while streaming: no second pass over the file
    started = last_log = time.monotonic()
    total = 0
    try:
        with stream(file.source.url, policy, headers, cancel) as download:
            response = download.response
            resumed = (
                offset
                and response.status_code == 206
                and response.headers.get("Content-Range", "").startswith(f"bytes {offset}-")
            )
            if resumed:
                with part.open("rb") as existing:
                    digest = hashlib.file_digest(existing, "sha256")
                done = offset
                log.info("%s: resuming after %s", file.dest, format_size(offset))
            total = done + download.total if download.total else 0
            with part.open("ab" if resumed else "wb") as out:
                for chunk in download.chunks(already=done):
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if time.monotonic() - last_log >= PROGRESS_EVERY_S:
                        last_log = time.monotonic()
                        share = f" ({100 * done / total:.0f}% of {format_size(total)})" if total else ""
                        log.info("%s: %s%s", file.dest, format_size(done), share)
        if total and done != total:
            kept = f"; {part.name} kept, run again to resume" if resumable else ""
            raise FetchError(f"{file.dest}: got {done} of {total} bytes from {file.shown_url}{kept}")
    except DownloadStatusError as error:
        part.unlink(missing_ok=True)
        if offset and error.status == 416:  # the partial file is no prefix of this one: start over
            return _download(file, target, policy, cancel, token)
        raise FetchError(f"{file.dest}: {error}") from None
    except DownloadError as error:
        if not resumable or isinstance(error, DownloadCancelled):
            part.unlink(missing_ok=True)
        kept = ""
        if part.is_file():
            kept = f"; {format_size(part.stat().st_size)} kept in {part.name}, run again to resume"
        raise FetchError(f"{file.dest}: {error}{kept}") from None
    except BaseException:
        if not resumable:
            part.unlink(missing_ok=True)
        raise
    actual = digest.hexdigest()
    if file.sha256 is not None and actual != file.sha256:
        part.unlink(missing_ok=True)
        raise FetchError(
            f"{file.dest}: checksum mismatch for {file.shown_url}: the file is not the pinned sha256 {file.sha256}; "
            "the download was removed"
        )
    os.replace(part, target)
    elapsed = time.monotonic() - started
    log.info("%s: done, %s in %.1fs (sha256 %s)", file.dest, format_size(done), elapsed, actual)
    return actual


def _hub_headers(file: WeightFile, policy: DownloadPolicy, token: str | None = None) -> dict[str, str]:
    """The caller's own hub `token` for a hub file; else the hub token (HF_TOKEN) for the operator's own hub files
    only: a caller's lora_weights never gets it, or any caller could read the private repos the token opens.
    (stream() drops the header on a redirect to another host.)"""
    if not file.source.is_hub:
        return {}
    if token is not None:
        return {"Authorization": f"Bearer {token}"}
    if policy.public_hosts_only:
        return {}
    from huggingface_hub.utils import build_hf_headers

    return {key: value for key, value in build_hf_headers().items() if key.lower() == "authorization"}


def fetch_one(
    file: WeightFile,
    weights_dir: Path,
    policy: DownloadPolicy,
    cancel: threading.Event | None = None,
    token: str | None = None,
) -> Path:
    """The file in place (already there and verified, or downloaded under `policy`); FetchError names it, the
    source and why. Setting `cancel` stops the download (between chunks); `token`: the caller's own Hub token,
    for a hub file."""
    target = weights_dir / file.dest
    if target.is_file():
        if file.sha256 is None:
            log.info("%s: already present (no checksum given), kept", file.dest)
            return target
        if sha256_of(target) == file.sha256:
            log.info("%s: already present, checksum matches", file.dest)
            return target
        log.warning("%s: present but its checksum differs from the pinned one: downloading again", file.dest)
    log.info("%s: downloading from %s", file.dest, file.shown_url)
    _download(file, target, policy, cancel, token)
    return target


def fetch_weights(
    files: list[WeightFile], weights_dir: Path, policy: DownloadPolicy | None = None, workers: int = 4
) -> list[Path]:
    """Download every file (in parallel) that is not already there and verified; FetchError lists all failures.
    The operator's URLs: `policy` defaults to the operator policy of the PUNKS_DOWNLOAD_* settings."""
    if not files:
        return []
    policy = policy or operator_policy()
    weights_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    errors: list[str] = []
    lock = threading.Lock()

    def run(file: WeightFile) -> Path | None:
        try:
            return fetch_one(file, weights_dir, policy)
        except FetchError as error:
            with lock:
                errors.append(str(error))
            return None

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(files))), thread_name_prefix="fetch") as pool:
        paths = list(pool.map(run, files))
    if errors:
        raise FetchError(f"{len(errors)} of {len(files)} weight files failed:\n  " + "\n  ".join(sorted(errors)))
    log.info("weights ready in %s (%d files, %.1fs)", weights_dir, len(files), time.monotonic() - started)
    return [p for p in paths if p is not None]


def operator_policy() -> DownloadPolicy:
    """The looser policy of URLs the operator typed (PUNKS_WEIGHTS_URLS, `weights download`)."""
    return DownloadPolicy.for_settings(DownloadSettings()).for_operator()


def fetch_listed_weights(spec: str, weights_dir: Path) -> list[Path]:
    """What Cog's setup calls with PUNKS_WEIGHTS_URLS (Settings.weights_urls): a no-op when it is empty."""
    return fetch_weights(parse_spec(spec), weights_dir) if spec.strip() else []


def main(argv: list[str] | None = None) -> int:
    from service.config import Settings

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = sys.argv[1:] if argv is None else argv
    settings = Settings()
    spec = " ".join(args) if args else settings.weights_urls
    if not spec.strip():
        print(
            f"usage: python -m service.weights.fetch [dest=source[#sha256=hex] ...]  (or set {ENV_VAR})",
            file=sys.stderr,
        )
        return 2
    try:
        for path in fetch_weights(parse_spec(spec), settings.weights_dir):
            print(path)
    except (ValueError, FetchError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
