"""LoRA files from URLs (Cog's `lora_weights` input), downloaded once and kept in a bounded LRU cache.

A URL is downloaded (service/weights/fetch.py: https or hf://, the Hub's web URLs and owner/repo/file shorthand
(Source.parse_pasted), optional #sha256 pin; a .tar, as a Replicate training outputs, must hold one .safetensors,
which is taken out of it) with the caller's own Hub token if given (never the server's) under the strict download
policy (service/weights/policy.py: public hosts only, deadlines, a size cap) on the cache's own bounded pool of
threads, never the event loop's default one, and a download stops when the prediction that asked for it is
cancelled. The file is registered with the engine under a fresh private name (Engine.add_lora, which runs the
start-up LoRA guard): only requests naming the same URL use it, with no download; it is never selectable by name
nor listed. A file the guard refuses is deleted and not kept, so its request fails with the guard's message.

Eviction is simple on purpose: only entries nobody holds are evicted. A prediction holds its entry from before its
request is queued until its result is back (`use`), so a queued or rendering request never loses its LoRA. With
every entry held the cache briefly holds more than `capacity` files; the next download evicts back down to it.
Eviction runs in the downloading thread, never on the event loop (unregistering waits for the GPU thread).

A file fetched with a token is cached under the URL and a hash of that token: only a request with the same token
gets it from the cache, never one without.

Names and file names are built from a counter and a hash of the URL, and the logs show the URL without its
query string (Source.shown): signed URLs carry secrets there. A name is never reused, so a file evicted while a
newer download of the same URL arrives cannot be mistaken for it. Messages name the URL, never the cache folder.
"""

import asyncio
import hashlib
import logging
import tarfile
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from itertools import count
from pathlib import Path

from service.errors import RequestError
from service.lora.inspect import LoraError, LoraInfo
from service.lora.switch import LORA_SUFFIX
from service.weights.fetch import FetchError, WeightFile, fetch_one
from service.weights.policy import DownloadPolicy
from service.weights.source import Source

log = logging.getLogger(__name__)

FIELD = "lora_weights"
NAME_PREFIX = "url-"  # of the cache's files: only those are removed from the folder at start
WAIT_POLL_S = 0.5  # how often a request waiting for another's download of its URL checks its own cancel

TAR_SUFFIX = ".tar"
MAX_TAR_MEMBERS = 1000  # a training's .tar holds a handful of files
_Key = tuple[str, str | None, str | None]  # location, pinned sha256, hash of the caller's token

Register = Callable[[str, Path], LoraInfo]  # Engine.add_lora, run on the GPU thread
Unregister = Callable[[str], None]  # Engine.remove_lora, likewise


@dataclass(eq=False)
class CachedLora:
    name: str  # what the request names as its `lora` (the engine's allow-list)
    path: Path
    info: LoraInfo  # the guard's inspection
    shown: str  # the URL as it may be logged
    users: int = 0  # predictions holding it; only an entry with none may be evicted


class LoraUrlCache:
    def __init__(
        self,
        folder: Path,
        capacity: int,
        register: Register,
        unregister: Unregister,
        policy: DownloadPolicy,
        workers: int = 4,
    ):
        """`register`/`unregister` add a checked file to the engine and remove it; called from the cache's threads.
        `workers`: downloads at once; more requests wait for a free thread (each can still be cancelled)."""
        self.folder = folder
        self.capacity = capacity
        self.policy = policy
        self._register = register
        self._unregister = unregister
        self._threads = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lora-url")
        self._entries: OrderedDict[_Key, CachedLora] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()  # guards _entries, _loading and every entry's users
        self._loading: dict[_Key, threading.Lock] = {}  # one download per URL (and token) at a time
        self._names = count(1)
        if folder.is_dir():  # files of an earlier process are in no index: they would never be evicted
            for stale in folder.glob(f"{NAME_PREFIX}*"):
                stale.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self._entries)

    def acquire(self, url: str, cancel: threading.Event | None = None, token: str | None = None) -> CachedLora:
        """The checked, registered LoRA at `url`, held until `release` (blocking: call it off the event loop).
        `token`: the caller's own Hub token, sent for a hub file only. RequestError("lora_weights", ...) when the
        cache is off, the URL is malformed or refused, the download fails or is cancelled (`cancel` set), or the
        guard refuses the file."""
        if self.capacity <= 0:
            raise RequestError(FIELD, "not enabled on this deployment (PUNKS_LORA_URL_CACHE_SIZE is 0)")
        try:
            source = Source.parse_pasted(url, context=FIELD)
        except ValueError as error:
            raise RequestError(FIELD, str(error).removeprefix(f"{FIELD}: ")) from None
        key = (source.location, source.sha256, hashlib.sha256(token.encode()).hexdigest() if token else None)
        with self._lock:
            if cached := self._hold(key):
                return cached
            loading = self._loading.setdefault(key, threading.Lock())
        while not loading.acquire(timeout=WAIT_POLL_S):  # another request is downloading this URL: wait for it
            if cancel is not None and cancel.is_set():
                raise RequestError(FIELD, "cancelled")
        try:
            with self._lock:
                if cached := self._hold(key):
                    return cached
            try:
                entry = self._download(source, cancel, token)
            finally:
                with self._lock:
                    self._loading.pop(key, None)
        finally:
            loading.release()
        with self._lock:
            self._entries[key] = entry
            entry.users = 1
            victims = self._overflow()
        for victim in victims:
            self._evict(victim)
        return entry

    def release(self, entry: CachedLora) -> None:
        """The holder's request is done: the entry may be evicted again (by a later download)."""
        with self._lock:
            entry.users -= 1

    @asynccontextmanager
    async def use(self, url: str, token: str | None = None) -> AsyncIterator[CachedLora]:
        """Hold the LoRA at `url` for the body (download and registration on the cache's threads). A prediction
        cancelled while its download runs stops that download (within the stall timeout); one cancelled while its
        file is being registered releases the entry once that is done."""
        cancel = threading.Event()
        acquiring = asyncio.wrap_future(self._threads.submit(self.acquire, url, cancel, token))
        try:
            entry = await asyncio.shield(acquiring)
        except asyncio.CancelledError:
            cancel.set()
            acquiring.add_done_callback(self._release_when_acquired)
            raise
        try:
            yield entry
        finally:
            self.release(entry)

    def _release_when_acquired(self, acquiring: asyncio.Future) -> None:
        if not acquiring.cancelled() and acquiring.exception() is None:
            self.release(acquiring.result())

    def _hold(self, key: "_Key") -> CachedLora | None:
        """The cached entry, held and made the most recent; None when absent. Under self._lock."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.users += 1
            self._entries.move_to_end(key)
        return entry

    def _download(self, source: Source, cancel: threading.Event | None, token: str | None) -> CachedLora:
        digest = hashlib.sha256(source.location.encode()).hexdigest()[:12]
        name = f"{NAME_PREFIX}{digest}-{next(self._names)}"
        is_tar = source.url.partition("?")[0].endswith(TAR_SUFFIX)
        fetched = name + (TAR_SUFFIX if is_tar else LORA_SUFFIX)
        try:
            path = fetch_one(WeightFile.of(fetched, source), self.folder, self.policy, cancel, token)
        except FetchError as error:  # "<file name>: <host>: <rule>": the cache's file name means nothing to a caller
            raise RequestError(FIELD, str(error).removeprefix(f"{fetched}: ")) from None
        if is_tar:
            path = _take_safetensors_out(path, self.folder / (name + LORA_SUFFIX), source.shown)
        try:
            info = self._register(name, path)
        except BaseException as error:  # a refused file is not kept
            path.unlink(missing_ok=True)
            if isinstance(error, LoraError):  # the guard's message (family, keys, shapes), naming the URL
                raise RequestError(FIELD, str(error).replace(str(path), source.shown)) from None
            raise
        log.info("lora_weights: %s downloaded, checked and cached as %s", source.shown, name)
        return CachedLora(name, path, info, source.shown)

    def _overflow(self) -> list[CachedLora]:
        """Take out the least recently used entries nobody holds until at most `capacity` are left. Under the lock."""
        victims = []
        for key, entry in list(self._entries.items()):
            if len(self._entries) <= self.capacity:
                break
            if entry.users == 0:
                victims.append(self._entries.pop(key))
        return victims

    def _evict(self, entry: CachedLora) -> None:
        self._unregister(entry.name)  # returns once no batch uses it: the file may go
        entry.path.unlink(missing_ok=True)
        log.info("lora_weights: evicted %s (%s), least recently used", entry.name, entry.shown)


def _take_safetensors_out(tar_path: Path, target: Path, shown: str) -> Path:
    """The one .safetensors member of a .tar (a Replicate training's output), written to `target`; the .tar is
    deleted either way. RequestError naming the URL when it holds none, several, or is no tar file. Only the
    member's bytes are read (never extracted by its own name), so no path in the archive is ever written.

    Only a plain .tar with at most MAX_TAR_MEMBERS members is read, and its .safetensors must not be sparse: a
    compressed or sparse member expands a download of a few kB into any size on disk, whereas a plain member's
    bytes are in the download, which the policy's size cap bounds."""
    try:
        with tarfile.open(tar_path, "r:") as archive:  # "r:": no decompression
            members = []
            for index, member in enumerate(archive):
                if index == MAX_TAR_MEMBERS:
                    raise RequestError(FIELD, f"{shown}: the .tar holds more than {MAX_TAR_MEMBERS} members")
                if member.isfile() and member.name.endswith(LORA_SUFFIX):
                    members.append(member)
            if len(members) != 1:
                found = ", ".join(_shown_name(m.name) for m in members[:5]) or "none"
                raise RequestError(FIELD, f"{shown}: the .tar must hold exactly one .safetensors file (found: {found})")
            if members[0].issparse():
                raise RequestError(FIELD, f"{shown}: the .safetensors in the .tar is a sparse file; store it whole")
            source = archive.extractfile(members[0])
            assert source is not None  # a regular file
            with source, target.open("wb") as out:
                while chunk := source.read(1 << 20):
                    out.write(chunk)
    except tarfile.TarError:
        target.unlink(missing_ok=True)
        raise RequestError(FIELD, f"{shown}: not a readable .tar file (a plain, uncompressed one)") from None
    finally:
        tar_path.unlink(missing_ok=True)
    return target


def _shown_name(name: str) -> str:
    """A member's name as a message may quote it: at most 100 characters, and valid UTF-8 (tarfile reads the bytes
    of a name that is not UTF-8 as lone surrogates)."""
    return name[:100].encode("utf-8", "backslashreplace").decode("utf-8")
