"""LoRA files from URLs (service/lora/cache.py) against a loopback http.server, and the engine's run-time LoRA
registration (Engine.add_lora / remove_lora) on the smoke model. Through the real cog server: tests/test_predict.py."""

import asyncio
import functools
import http.server
import io
import re
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

from devtools.random_lora import kohya_metadata, random_kohya_lora
from devtools.smoke import build_smoke_pipeline
from service.errors import RequestError
from service.lora.cache import LoraUrlCache
from service.lora.inspect import LoraError, LoraInfo, inspect_sd15_lora
from tests.hostile_hosts import ALLOWED_HOST, TEST_POLICY
from tests.lora_files import sd15_modules, sdxl_modules, write_lora


class _Counting(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self) -> None:
        type(self).requests.append(self.path.partition("?")[0])
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[str]]]:
    """(base URL, request paths): a loopback server over SD1.5-shaped a/b/c.safetensors and an SDXL-shaped file."""
    folder = tmp_path_factory.mktemp("served-loras")
    for name in "abc":
        write_lora(folder / f"{name}.safetensors", sd15_modules())
    write_lora(folder / "sdxl.safetensors", sdxl_modules())
    write_hostile_tars(folder)
    requests: list[str] = []
    handler = type("Handler", (_Counting,), {"requests": requests})
    httpd = http.server.ThreadingHTTPServer((ALLOWED_HOST, 0), functools.partial(handler, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://{ALLOWED_HOST}:{httpd.server_address[1]}", requests
    httpd.shutdown()
    httpd.server_close()


EXPANDED_BYTES = 16 * 2**20  # what each hostile .tar's few kB would become on disk


def write_hostile_tars(folder: Path) -> None:
    """.tar files that are small to download and large once unpacked, or many-membered, or oddly named."""
    zeros = folder / "zeros.bin"
    with zeros.open("wb") as sparse_zeros:
        sparse_zeros.truncate(EXPANDED_BYTES)
    with tarfile.open(folder / "gzip.tar", "w:gz") as tar:
        tar.add(zeros, arcname="lora.safetensors")
    zeros.unlink()
    with tarfile.open(folder / "sparse.tar", "w", format=tarfile.PAX_FORMAT) as tar:  # GNU sparse 1.0: one hole
        member = tarfile.TarInfo("GNUSparseFile.0/lora.safetensors")
        member.pax_headers = {
            "GNU.sparse.major": "1",
            "GNU.sparse.minor": "0",
            "GNU.sparse.name": "lora.safetensors",
            "GNU.sparse.realsize": str(EXPANDED_BYTES),
        }
        sparse_map = b"1\n0\n0\n".ljust(tarfile.BLOCKSIZE, b"\0")  # one data region: none at all
        member.size = len(sparse_map)
        tar.addfile(member, io.BytesIO(sparse_map))
    with tarfile.open(folder / "many.tar", "w") as tar:
        for index in range(1001):
            tar.addfile(tarfile.TarInfo(f"{index}.txt"), io.BytesIO())
    with tarfile.open(folder / "undecodable.tar", "w") as tar:  # names that are no UTF-8, as tarfile reads them
        for name in ("\udcff.safetensors", "x" * 300 + ".safetensors"):
            tar.addfile(tarfile.TarInfo(name), io.BytesIO())


class FakeEngine:
    """Registers with the file guard only (no model): what the cache sees of Engine.add_lora / remove_lora."""

    def __init__(self, delay_s: float = 0.0):
        self.loras: dict[str, Path] = {}
        self.removed: list[str] = []
        self.delay_s = delay_s

    def add_lora(self, name: str, path: Path) -> LoraInfo:
        time.sleep(self.delay_s)
        info = inspect_sd15_lora(path, 32)
        self.loras[name] = path
        return info

    def remove_lora(self, name: str) -> None:
        del self.loras[name]
        self.removed.append(name)


def make_cache(folder: Path, capacity: int, engine: FakeEngine | None = None) -> tuple[LoraUrlCache, FakeEngine]:
    engine = engine or FakeEngine()
    return LoraUrlCache(folder, capacity, engine.add_lora, engine.remove_lora, TEST_POLICY), engine


def test_off_by_default_and_malformed_urls_name_the_field(tmp_path: Path):
    off, _ = make_cache(tmp_path, 0)
    with pytest.raises(
        RequestError, match=r"^lora_weights: not enabled on this deployment \(PUNKS_LORA_URL_CACHE_SIZE"
    ):
        off.acquire("https://host/a.safetensors")
    cache, _ = make_cache(tmp_path, 2)
    for url, message in [
        ("ftp://host/a", "only http(s) and hf:// are supported"),
        ("https://h/a#sha256=12", "64 hex"),
        ("hf://owner/repo", "expected hf://owner/repo/path"),
        ("hf://../../etc/passwd", "../.. is not a Hugging Face repository name"),
        ("https://h:99999/a", "not a valid URL (its host, port or characters)"),
        ("https://h/a\x00", "not a valid URL (its host, port or characters)"),
        ("https://xn--/a", "not a valid URL (its host, port or characters)"),  # only the HTTP client's IDNA says so
    ]:
        with pytest.raises(RequestError, match=f"^lora_weights: .*{re.escape(message)}") as refused:
            cache.acquire(url)
        assert refused.value.field == "lora_weights"
    assert len(cache) == 0


def test_same_url_is_downloaded_once_and_the_least_recently_used_is_evicted(served, tmp_path: Path):
    base, requests = served
    cache, engine = make_cache(tmp_path / "cache", 2)
    before = len(requests)
    a = cache.acquire(f"{base}/a.safetensors?sig=secret")
    cache.release(a)
    assert cache.acquire(f"{base}/a.safetensors?sig=secret") is a  # reused: no download
    cache.release(a)
    b = cache.acquire(f"{base}/b.safetensors")
    cache.release(b)
    cache.release(cache.acquire(f"{base}/a.safetensors?sig=secret"))  # a is now the most recent
    assert requests[before:] == ["/a.safetensors", "/b.safetensors"]
    assert "secret" not in a.name + str(a.path) + a.shown and a.shown == f"{base}/a.safetensors"
    c = cache.acquire(f"{base}/c.safetensors")
    assert engine.removed == [b.name] and not b.path.exists()  # b: the least recently used
    assert sorted(engine.loras) == sorted([a.name, c.name]) and a.path.is_file() and c.path.is_file()
    assert len(cache) == 2
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([a.path.name, c.path.name])
    again = cache.acquire(f"{base}/b.safetensors")  # evicted: downloaded again, under a new name
    assert again.name != b.name and requests[-1] == "/b.safetensors"


def test_an_entry_in_use_is_never_evicted(served, tmp_path: Path):
    base, _ = served
    cache, engine = make_cache(tmp_path, 1)
    a = cache.acquire(f"{base}/a.safetensors")  # held: its request is queued
    b = cache.acquire(f"{base}/b.safetensors")
    assert engine.removed == [] and a.path.is_file() and len(cache) == 2  # over capacity while both are held
    cache.release(a)
    cache.release(b)
    cache.release(cache.acquire(f"{base}/c.safetensors"))
    assert engine.removed == [a.name, b.name] and len(cache) == 1  # back down to capacity, oldest first


def test_a_refused_file_fails_with_the_guards_message_and_is_not_kept(served, tmp_path: Path):
    base, requests = served
    cache, engine = make_cache(tmp_path, 2)
    with pytest.raises(RequestError) as refused:
        cache.acquire(f"{base}/sdxl.safetensors?token=secret")
    message = str(refused.value)
    assert message.startswith(f"lora_weights: {base}/sdxl.safetensors is a SDXL LoRA")
    assert str(tmp_path) not in message  # the URL, not the cache's file
    assert "is a SDXL LoRA" in message and "this service needs an SD1.5 kohya LoRA" in message
    assert "secret" not in message
    assert len(cache) == 0 and engine.loras == {} and not list(tmp_path.iterdir())
    with pytest.raises(RequestError, match="SDXL"):
        cache.acquire(f"{base}/sdxl.safetensors")
    assert requests[-2:] == ["/sdxl.safetensors"] * 2  # a refusal is not cached: tried again
    with pytest.raises(RequestError, match=r"^lora_weights: 127\.0\.0\.2: answered HTTP 404$"):
        cache.acquire(f"{base}/missing?sig=secret")


def test_a_tar_that_would_unpack_to_more_than_was_downloaded_is_refused_and_nothing_is_kept(served, tmp_path: Path):
    base, _ = served
    cache, engine = make_cache(tmp_path, 2)
    for name, reason in [
        ("gzip.tar", "not a readable .tar file (a plain, uncompressed one)"),
        ("sparse.tar", "the .safetensors in the .tar is a sparse file"),
        ("many.tar", "the .tar holds more than 1000 members"),
    ]:
        with pytest.raises(RequestError, match=f"^lora_weights: {re.escape(f'{base}/{name}: {reason}')}"):
            cache.acquire(f"{base}/{name}")
    assert not list(tmp_path.iterdir()) and engine.loras == {} and len(cache) == 0


def test_member_names_are_quoted_short_and_as_valid_text(served, tmp_path: Path):
    base, _ = served
    cache, _ = make_cache(tmp_path, 2)
    with pytest.raises(RequestError, match="exactly one .safetensors file") as refused:
        cache.acquire(f"{base}/undecodable.tar")
    found = str(refused.value).partition("(found: ")[2]
    assert found.encode("utf-8") and found.startswith("\\udcff.safetensors, ") and len(found) < 250


def test_concurrent_requests_for_one_url_share_one_download(served, tmp_path: Path):
    base, requests = served
    cache, engine = make_cache(tmp_path, 2, FakeEngine(delay_s=0.3))
    before = len(requests)
    threads = [threading.Thread(target=lambda: held.append(cache.acquire(f"{base}/a.safetensors"))) for _ in range(4)]
    held: list = []
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert requests[before:] == ["/a.safetensors"] and len(engine.loras) == 1
    assert len({id(entry) for entry in held}) == 1 and held[0].users == 4


def test_a_prediction_cancelled_during_its_download_releases_the_entry(served, tmp_path: Path):
    base, _ = served
    registering, proceed = threading.Event(), threading.Event()
    engine = FakeEngine()
    add = engine.add_lora

    def slow_add(name: str, path: Path) -> LoraInfo:
        registering.set()
        proceed.wait(10)
        return add(name, path)

    cache = LoraUrlCache(tmp_path, 1, slow_add, engine.remove_lora, TEST_POLICY)

    async def cancel_while_registering() -> None:
        async def predict() -> None:
            async with cache.use(f"{base}/a.safetensors"):
                raise AssertionError("the body must not run")

        task = asyncio.create_task(predict())
        while not registering.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        proceed.set()
        deadline = time.monotonic() + 10
        while not (len(cache) and all(entry.users == 0 for entry in cache._entries.values())):
            assert time.monotonic() < deadline, "the cancelled prediction still holds its entry"
            await asyncio.sleep(0.01)

    asyncio.run(cancel_while_registering())
    assert len(cache) == 1  # cached for the next prediction, and evictable again


def test_files_of_an_earlier_process_are_removed_at_start(tmp_path: Path):
    (tmp_path / "url-0123456789ab-1.safetensors").write_bytes(b"old")
    (tmp_path / "url-0123456789ab-2.safetensors.part").write_bytes(b"old")
    (tmp_path / "mine.txt").write_text("not the cache's")
    make_cache(tmp_path, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


# --- the engine: LoRAs added at run time -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def url_engine(smoke_settings):
    """The smoke engine as Cog loads it with lora_weights on: no loras/ folder, the switcher all the same."""
    from service.engine import Engine

    return Engine.load(smoke_settings.model_copy(update={"lora_url_cache_size": 2, "warmup": False}))


def test_an_added_lora_is_checked_fused_and_removed(url_engine, tmp_path: Path):
    from service.engine import GenerationRequest

    engine = url_engine
    assert engine.loras.switcher is not None and engine.lora_names == []
    good = tmp_path / "good.safetensors"
    save_file(random_kohya_lora(build_smoke_pipeline(), seed=3), str(good), metadata=kohya_metadata(32, 16))

    def raw(lora: str | None = None) -> np.ndarray:
        result = engine.generate(GenerationRequest("a punk", seed=5, num_inference_steps=1, lora=lora))
        return np.asarray(result.images[0].raw, dtype=np.int16)

    default = raw()
    assert engine.add_lora("url-good-1", good).path == good
    assert engine.lora_names == []  # private: listed nowhere, and no caller can name it
    with pytest.raises(RequestError, match="^lora: unknown LoRA 'url-good-1'; allowed: bespoke_punks$"):
        engine.check_request(GenerationRequest("a punk", lora="url-good-1"))
    assert np.abs(raw("url-good-1") - default).max() > 10
    assert np.array_equal(raw(), default)  # switching back: restored base weights, bit for bit
    switched = engine.generate(GenerationRequest("a punk", seed=5, num_inference_steps=1, lora="url-good-1"))
    assert switched.timings["lora_switch_s"] > 0
    engine.remove_lora("url-good-1")  # while fused: the next switch restores the base first
    assert engine.lora_names == [] and good not in engine.loras.switcher.loras
    assert all(key[0] != good for key in engine._negative_embeddings)
    with pytest.raises(RequestError, match="^lora: unknown LoRA 'url-good-1'"):
        engine.check_request(GenerationRequest("a punk", lora="url-good-1"))
    assert np.array_equal(raw(), default)


@pytest.mark.parametrize(
    ("modules", "message"),
    [
        (sdxl_modules(), "is a SDXL LoRA"),
        (sd15_modules(), "but the model's layer is"),  # SD1.5's real widths: not the smoke model's layers
    ],
)
def test_adding_a_wrong_lora_raises_the_guards_error(url_engine, tmp_path: Path, modules: dict, message: str):
    path = write_lora(tmp_path / "wrong.safetensors", modules)
    with pytest.raises(LoraError, match=message):
        url_engine.add_lora("url-wrong-1", path)
    assert "url-wrong-1" not in url_engine.loras.private and path not in url_engine.loras.switcher.loras


@pytest.mark.parametrize("mode", ["compile", "fp8"])
def test_compile_or_fp8_with_the_lora_url_cache_is_refused_at_load(smoke_settings, mode):
    from service.engine import Engine

    settings = smoke_settings.model_copy(update={"lora_url_cache_size": 8, mode: True, "warmup": False})
    with pytest.raises(ValueError, match=f"not supported with PUNKS_{mode.upper()} .*set PUNKS_LORA_URL_CACHE_SIZE=0"):
        Engine.load(settings)
