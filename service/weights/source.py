"""Where a weight file comes from, in the one syntax every download takes: `weights download --lora/--realesrgan`,
PUNKS_LORA_URL / PUNKS_REALESRGAN_URL, and each `dest=source` pair of PUNKS_WEIGHTS_URLS (Cog's setup):

    https://host/path/file                      any http(s) URL (signed URLs too)
    hf://owner/repo[@revision]/path/in/repo     a file on the Hugging Face Hub

either followed by an optional `#sha256=<64 hex digits>` that pins the file. A caller's LoRA (Cog's lora_weights)
may also be written the ways people paste one from the Hub (`Source.parse_pasted`):

    https://huggingface.co/owner/repo/blob/<revision>/path/file   (or /resolve/, or without https://)
    owner/repo/path/file                                          (shorthand of hf://owner/repo/path/file)

Signed URLs carry secrets in the query string, so messages, logs and the manifest only ever show `Source.shown`.
"""

import re
import urllib.parse
from dataclasses import dataclass

from huggingface_hub.utils import HFValidationError, validate_repo_id

from service.weights.policy import is_requestable

HUB_SCHEME = "hf://"
URL_SCHEMES = ("http", "https")
SOURCE_FORMS = "an https:// URL or hf://owner/repo/path"
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class HubFile:
    repo: str  # owner/name
    revision: str | None  # branch, tag or commit; None: the default branch
    path: str  # inside the repo


@dataclass(frozen=True)
class Source:
    """A URL or hub location, and the sha256 the file must have (None: not pinned)."""

    location: str
    sha256: str | None = None

    @classmethod
    def parse(cls, text: str, context: str | None = None) -> "Source":
        """ValueError naming `context` (default: the redacted location) and what is wrong, without secrets."""
        location, _, fragment = text.strip().partition("#")
        where = context or redact(location)
        sha256 = None
        if fragment:
            key, _, value = fragment.partition("=")
            if key != "sha256" or not _SHA256.fullmatch(value.lower()):
                raise ValueError(f"{where}: expected #sha256=<64 hex digits> after the location, got #{fragment}")
            sha256 = value.lower()
        if location.startswith(HUB_SCHEME):
            _hub_file(location, where)  # raises when incomplete
        elif not is_requestable(location):
            raise ValueError(f"{where}: not a valid URL (its host, port or characters)")
        elif urllib.parse.urlsplit(location).scheme not in URL_SCHEMES:
            raise ValueError(
                f"{where}: expected {SOURCE_FORMS} (only http(s) and hf:// are supported), got {redact(location)!r}"
            )
        return cls(location, sha256)

    @classmethod
    def parse_pasted(cls, text: str, context: str | None = None) -> "Source":
        """Source.parse, after rewriting the Hub's web URLs and the owner/repo/file shorthand to hf:// locations."""
        location, hash_mark, fragment = text.strip().partition("#")
        return cls.parse(_hub_location(location) + hash_mark + fragment, context)

    @property
    def is_hub(self) -> bool:
        return self.location.startswith(HUB_SCHEME)

    @property
    def shown(self) -> str:
        """What may be logged and recorded: a hub path as is, a URL without query, fragment or credentials."""
        return self.location if self.is_hub else redact(self.location)

    def hub_file(self) -> HubFile:
        return _hub_file(self.location, self.location)

    @property
    def url(self) -> str:
        """What is fetched: the URL itself, or the hub's https resolve URL of an hf:// file."""
        if not self.is_hub:
            return self.location
        from huggingface_hub import hf_hub_url  # only for hub sources

        hub = self.hub_file()
        return hf_hub_url(hub.repo, hub.path, revision=hub.revision)


_HUB_WEB = re.compile(
    r"(?:https?://)?(?:www\.)?(?:huggingface\.co|hf\.co)/([^/?#]+)/([^/?#]+)/(?:blob|resolve)/([^/?#]+)/([^?#]+)(?:\?[^#]*)?"
)
_SHORTHAND = re.compile(r"([\w-]+)/([\w.-]+)/([^:?#]+)")


def _hub_location(location: str) -> str:
    """hf://owner/repo@revision/path for a Hub web URL (blob or resolve) or owner/repo/path; anything else as is."""
    if match := _HUB_WEB.fullmatch(location):
        owner, repo, revision, path = match.groups()
        return f"{HUB_SCHEME}{owner}/{repo}@{urllib.parse.unquote(revision)}/{path}"
    if "://" not in location and (match := _SHORTHAND.fullmatch(location)):
        return f"{HUB_SCHEME}{location}"
    return location


def _hub_file(location: str, where: str) -> HubFile:
    """hf://owner/repo[@revision]/path/file -> its repo, revision and path."""
    parts = location.removeprefix(HUB_SCHEME).split("/", 2)
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"{where}: expected hf://owner/repo/path/to/file (or owner/repo@revision/...)")
    owner, repo, path = parts
    repo, _, revision = repo.partition("@")
    try:
        validate_repo_id(f"{owner}/{repo}")
    except HFValidationError:
        raise ValueError(f"{where}: {owner}/{repo} is not a Hugging Face repository name") from None
    return HubFile(f"{owner}/{repo}", revision or None, path)


def redact(url: str) -> str:
    """The URL without query, fragment or credentials: signed URLs carry secrets there."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))
