"""`weights download` (hub patterns, URLs with checksums and resume, hf:// paths, the manifest) and
`weights check` on complete, incomplete and corrupt folders built from the smoke model. No network:
the hub calls are replaced, URLs are served by a loopback http.server that understands Range."""

import functools
import hashlib
import http.server
import json
import shutil
import threading
import urllib.parse
from pathlib import Path

import pytest
import torch
from huggingface_hub.utils import filter_repo_objects

from devtools.smoke import SMOKE_FOLDER, SMOKE_LORA, SMOKE_SINGLE_FILE, build_smoke_pipeline
from service.cli import main
from service.config import MANIFEST_FILE as MANIFEST
from service.config import SD15_FOLDER, Settings
from service.errors import WeightsError
from service.loading import load_base_pipeline
from service.weights.check import SINGLE_FILE_PREFIXES, check, check_base_model
from service.weights.download import SD15_PATTERNS, download
from service.weights.fetch import FetchError, WeightFile, fetch_listed_weights, fetch_weights, parse_spec
from service.weights.manifest import read_manifest
from service.weights.pinned import SD15_REVISION, SD15_SHA256, fetch_missing_weights, sd15_files
from service.weights.resolve import folder_variant
from service.weights.source import HubFile, Source

REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- a loopback server with Range support and a switch to cut a response short ------------------------------


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    seen: list[tuple[str, str | None]] = []
    cut_after: dict[str, int] = {}  # path -> bytes sent before the connection drops (once)

    def do_GET(self):
        type(self).seen.append((self.path, self.headers.get("Range")))
        file = Path(self.directory) / urllib.parse.urlsplit(self.path).path.lstrip("/")
        if not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        wanted = self.headers.get("Range")
        start = int(wanted.removeprefix("bytes=").removesuffix("-")) if wanted else 0
        if start >= len(data):
            self.send_error(416)
            return
        self.send_response(206 if wanted else 200)
        if wanted:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        cut = type(self).cut_after.pop(self.path, None)
        self.wfile.write(data[start:] if cut is None else data[start : start + cut])
        self.close_connection = cut is not None

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, folder, handler class): a loopback server over a folder."""
    folder = tmp_path_factory.mktemp("served")
    handler = type("Handler", (RangeHandler,), {"seen": [], "cut_after": {}})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", folder, handler
    httpd.shutdown()
    httpd.server_close()


# --- SD1.5 from the hub ------------------------------------------------------------------------------------

# The file names of the real repo (diffusers layout), including everything `weights download` must leave out.
HUB_FILES = [
    "model_index.json",
    "README.md",
    "v1-5-pruned-emaonly.safetensors",
    "v1-5-pruned-emaonly.fp16.safetensors",
    "v1-5-pruned.ckpt",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json",
    "safety_checker/model.fp16.safetensors",
    "safety_checker/model.safetensors",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.bin",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.bin",
]


def test_patterns_take_only_configs_tokenizer_and_the_fp16_safetensors():
    chosen = set(filter_repo_objects(HUB_FILES, allow_patterns=list(SD15_PATTERNS)))  # the hub client's own matcher
    assert chosen == {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.fp16.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    }


@pytest.fixture(scope="module")
def hub_repo(tmp_path_factory) -> Path:
    """The smoke model as the hub repo holds SD1.5: full-precision and fp16 files side by side, plus extras."""
    folder = tmp_path_factory.mktemp("hub")
    pipe = build_smoke_pipeline()
    pipe.save_pretrained(folder)
    pipe.to(torch.float16).save_pretrained(folder, variant="fp16")
    for extra in (
        "v1-5-pruned-emaonly.fp16.safetensors",
        "safety_checker/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.non_ema.safetensors",
        "unet/diffusion_pytorch_model.fp16.bin",
    ):
        (folder / extra).parent.mkdir(exist_ok=True)
        (folder / extra).write_bytes(b"must not be downloaded")
    return folder


@pytest.fixture
def fake_hub(hub_repo: Path, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Replace the hub client: snapshot_download copies what the patterns select; hf_hub_download one file."""
    import huggingface_hub

    calls: list[dict] = []

    def snapshot_download(repo_id, *, revision=None, allow_patterns=None, local_dir=None, **rest):
        calls.append(
            {
                "repo_id": repo_id,
                "revision": revision,
                "allow_patterns": allow_patterns,
                "local_dir": Path(local_dir),
                **rest,
            }
        )
        files = [str(f.relative_to(hub_repo)) for f in hub_repo.rglob("*") if f.is_file()]
        for name in filter_repo_objects(files, allow_patterns=allow_patterns):
            (Path(local_dir) / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(hub_repo / name, Path(local_dir) / name)
        (Path(local_dir) / ".cache/huggingface").mkdir(parents=True, exist_ok=True)  # the client's resume state
        return str(local_dir)

    def hf_hub_download(repo_id, filename, *, revision=None, local_dir=None, **rest):
        calls.append({"repo_id": repo_id, "filename": filename, "revision": revision})
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(f"{repo_id}@{revision}:{filename}".encode())
        return str(target)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return calls


def test_download_fetches_the_fp16_folder_which_loads_with_the_fp16_variant(fake_hub, tmp_path: Path):
    settings = Settings(weights_dir=tmp_path / "weights")
    entries = download(settings)
    folder = settings.weights_dir / SD15_FOLDER
    (call,) = fake_hub
    assert call["repo_id"] == REPO and call["local_dir"] == folder and call["allow_patterns"] == list(SD15_PATTERNS)
    weights = sorted(str(f.relative_to(folder)) for f in folder.rglob("*.safetensors"))
    assert weights == [
        "text_encoder/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]
    assert folder_variant(folder) == "fp16"
    pipe = load_base_pipeline(folder, folder, torch.float32)  # diffusers needs variant="fp16" for such a folder
    assert pipe.unet.dtype == torch.float32
    manifest = read_manifest(settings.weights_dir)
    assert set(manifest) == {e.path for e in entries} and ".cache" not in json.dumps(list(manifest))
    unet = manifest[f"{SD15_FOLDER}/unet/diffusion_pytorch_model.fp16.safetensors"]
    data = (folder / "unet/diffusion_pytorch_model.fp16.safetensors").read_bytes()
    assert (unet.what, unet.size, unet.sha256) == ("base model", len(data), sha256(data))
    assert unet.source == f"hf://{REPO}/unet/diffusion_pytorch_model.fp16.safetensors"


def test_folder_with_full_precision_files_is_loaded_without_variant(smoke_dir: Path):
    assert folder_variant(smoke_dir / SMOKE_FOLDER) is None


@pytest.fixture
def hub_endpoint(served, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The hub's resolve URLs point at the loopback server: hf:// files go through the download policy like any URL."""
    import huggingface_hub.constants

    base, folder, handler = served
    monkeypatch.setattr(
        huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", base + "/{repo_id}/resolve/{revision}/{filename}"
    )
    handler.seen.clear()
    return folder


def hub_file(folder: Path, repo: str, revision: str, path: str, data: bytes) -> str:
    """Put `data` where the hub serves repo@revision/path; the request path it is fetched from."""
    served = folder / repo / "resolve" / revision / path
    served.parent.mkdir(parents=True, exist_ok=True)
    served.write_bytes(data)
    return f"/{repo}/resolve/{revision}/{path}"


def test_lora_and_upscaler_from_urls_and_hub_paths_with_checksums(hub_endpoint, served, tmp_path: Path):
    base, folder, handler = served
    (folder / "punks.safetensors").write_bytes(b"lora bytes")
    lora_url = f"{base}/punks.safetensors?sig=secret#sha256={sha256(b'lora bytes')}"
    settings = Settings(weights_dir=tmp_path, lora_url=lora_url)
    hub_bytes = b"owner/esrgan@v1:models/x2.pth"
    hub_path = hub_file(folder, "owner/esrgan", "v1", "models/x2.pth", hub_bytes)
    entries = download(
        settings, base=False, realesrgan=f"hf://owner/esrgan@v1/models/x2.pth#sha256={sha256(hub_bytes)}"
    )
    assert (tmp_path / "bespoke_punks.safetensors").read_bytes() == b"lora bytes"
    assert (tmp_path / "RealESRGAN_x2plus.pth").read_bytes() == hub_bytes
    assert (hub_path, None) in handler.seen
    manifest = read_manifest(tmp_path)
    assert manifest["bespoke_punks.safetensors"].source == f"{base}/punks.safetensors"  # no query string
    assert manifest["bespoke_punks.safetensors"].sha256 == sha256(b"lora bytes")
    assert manifest["RealESRGAN_x2plus.pth"].source == "hf://owner/esrgan@v1/models/x2.pth"
    assert {e.what for e in entries} == {"lora", "realesrgan"}


def test_checksum_failure_removes_the_file_and_records_nothing(hub_endpoint, served, tmp_path: Path, capsys):
    base, folder, _ = served
    hub_file(folder, "o/r", "main", "x.pth", b"not what was pinned")
    (folder / "other.safetensors").write_bytes(b"someone else's file")
    wrong = "0" * 64
    with pytest.raises(FetchError, match=rf"checksum mismatch .*not the pinned sha256 {wrong}.*removed"):
        download(Settings(weights_dir=tmp_path), base=False, lora=f"{base}/other.safetensors#sha256={wrong}")
    assert not list(tmp_path.rglob("*.safetensors*")) and not (tmp_path / MANIFEST).exists()
    with pytest.raises(FetchError, match="checksum mismatch for hf://o/r/x.pth"):
        download(Settings(weights_dir=tmp_path), base=False, realesrgan=f"hf://o/r/x.pth#sha256={wrong}")
    assert not (tmp_path / "RealESRGAN_x2plus.pth").exists()


def test_cli_download_failure_is_exit_1_with_the_reason(served, tmp_path: Path, monkeypatch, capsys):
    base, _, _ = served
    monkeypatch.setenv("PUNKS_WEIGHTS_DIR", str(tmp_path))
    assert main(["weights", "download", "--no-base", "--lora", f"{base}/not-there.safetensors"]) == 1
    assert "HTTP 404" in capsys.readouterr().err


def test_a_broken_download_is_resumed_with_a_range_request(served, tmp_path: Path):
    base, folder, handler = served
    data = bytes(range(256)) * 12_000  # ~3 MB: several chunks
    (folder / "big.bin").write_bytes(data)
    handler.cut_after["/big.bin"] = 1_000_000
    file = WeightFile("big.bin", f"{base}/big.bin", sha256(data))
    with pytest.raises(FetchError, match="the connection broke off; .* kept in big.bin.part, run again to resume"):
        fetch_weights([file], tmp_path)
    assert (tmp_path / "big.bin.part").stat().st_size == 1_000_000
    fetch_weights([file], tmp_path)
    assert (tmp_path / "big.bin").read_bytes() == data and not (tmp_path / "big.bin.part").exists()
    assert handler.seen[-1] == ("/big.bin", "bytes=1000000-")


def test_without_a_checksum_a_partial_file_is_not_resumed(served, tmp_path: Path):
    base, folder, handler = served
    (folder / "small.bin").write_bytes(b"x" * 5000)
    (tmp_path / "small.bin.part").write_bytes(b"stale")
    fetch_weights([WeightFile("small.bin", f"{base}/small.bin")], tmp_path)
    assert (tmp_path / "small.bin").read_bytes() == b"x" * 5000 and handler.seen[-1] == ("/small.bin", None)


def test_a_partial_file_longer_than_the_download_starts_over(served, tmp_path: Path):
    base, folder, handler = served
    (folder / "short.bin").write_bytes(b"short")
    (tmp_path / "short.bin.part").write_bytes(b"much longer than the file")
    fetch_weights([WeightFile("short.bin", f"{base}/short.bin", sha256(b"short"))], tmp_path)
    assert (tmp_path / "short.bin").read_bytes() == b"short"
    assert handler.seen[-2:] == [("/short.bin", "bytes=25-"), ("/short.bin", None)]


@pytest.mark.parametrize(
    "text, message",
    [
        ("ftp://h/x", "expected an https:// URL or hf://"),
        ("hf://owner/repo", "expected hf://owner/repo/path/to/file"),
        ("https://h/x#sha256=12", "64 hex digits"),
        ("https://h/x?sig=secret#md5=" + "a" * 32, "expected #sha256="),
    ],
)
def test_bad_sources_are_refused_before_downloading(text: str, message: str):
    with pytest.raises(ValueError, match=message) as error:
        Source.parse(text)
    assert "secret" not in str(error.value)


def test_weights_urls_take_the_same_sources_as_weights_download():
    """PUNKS_WEIGHTS_URLS (Cog's setup) parses each source with Source.parse: hub paths too."""
    digest = "cd" * 32
    files = parse_spec(
        f"bespoke_punks.safetensors=hf://owner/punks@v1/loras/punks.safetensors#sha256={digest} "
        "sd/v1-5.safetensors=hf://owner/sd15/v1-5.safetensors"
    )
    assert files == [
        WeightFile("bespoke_punks.safetensors", "hf://owner/punks@v1/loras/punks.safetensors", digest),
        WeightFile("sd/v1-5.safetensors", "hf://owner/sd15/v1-5.safetensors"),
    ]
    assert files[0].source == Source.parse(f"hf://owner/punks@v1/loras/punks.safetensors#sha256={digest}")
    assert files[0].source.hub_file() == HubFile("owner/punks", "v1", "loras/punks.safetensors")
    assert files[1].source.hub_file() == HubFile("owner/sd15", None, "v1-5.safetensors")
    with pytest.raises(ValueError, match="PUNKS_WEIGHTS_URLS: x: expected hf://owner/repo/path/to/file"):
        parse_spec("x=hf://owner/repo")


def test_weights_urls_fetch_hub_entries_from_the_hub(hub_endpoint, served, tmp_path: Path):
    _, _, handler = served
    hub_bytes = b"owner/punks@v1:punks.safetensors"
    hub_path = hub_file(hub_endpoint, "owner/punks", "v1", "punks.safetensors", hub_bytes)
    spec = f"loras/punks.safetensors=hf://owner/punks@v1/punks.safetensors#sha256={sha256(hub_bytes)}"
    assert fetch_listed_weights(spec, tmp_path) == [tmp_path / "loras/punks.safetensors"]
    assert (tmp_path / "loras/punks.safetensors").read_bytes() == hub_bytes
    assert handler.seen == [(hub_path, None)]
    fetch_listed_weights(spec, tmp_path)  # there and verified: not downloaded again
    assert len(handler.seen) == 1


# --- check -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_parameters() -> dict[str, int]:
    """What check expects of the smoke model (it expects SD1.5's counts of a real one)."""
    pipe = build_smoke_pipeline()
    return {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("unet", "text_encoder", "vae")}


@pytest.fixture
def weights_dir(smoke_dir: Path, tmp_path: Path) -> Path:
    """A complete weights folder: the smoke model's diffusers folder and its LoRA."""
    shutil.copytree(smoke_dir / SMOKE_FOLDER, tmp_path / SMOKE_FOLDER)
    shutil.copy(smoke_dir / SMOKE_LORA, tmp_path / "bespoke_punks.safetensors")
    return tmp_path


def by_what(findings) -> dict[str, list]:
    grouped: dict[str, list] = {}
    for finding in findings:
        grouped.setdefault(finding.what, []).append(finding)
    return grouped


def test_check_complete_folder(weights_dir: Path, smoke_parameters):
    findings = check(Settings(weights_dir=weights_dir), expected=smoke_parameters)
    assert not [f for f in findings if f.fails], [f.line() for f in findings]
    found = by_what(findings)
    assert {f.status for name in ("unet", "text_encoder", "vae", "tokenizer", "lora") for f in found[name]} == {"ok"}
    assert "49408 tokens" in found["tokenizer"][0].detail and "rank 32" in found["lora"][0].detail
    assert found["realesrgan"][0].status == "missing" and not found["realesrgan"][0].required


def test_check_knows_the_smoke_model_is_not_sd15(weights_dir: Path):
    unet = by_what(check(Settings(weights_dir=weights_dir)))["unet"][0]
    assert unet.status == "bad" and "SD1.5's has 859.5M: not SD1.5" in unet.detail


def test_check_single_file_checkpoint(smoke_dir: Path, smoke_parameters):
    settings = Settings(weights_dir=smoke_dir, base_model=smoke_dir / SMOKE_SINGLE_FILE)
    (finding,) = check_base_model(settings, smoke_parameters)
    assert finding.status == "ok", finding.line()
    assert set(SINGLE_FILE_PREFIXES) == set(smoke_parameters)


def test_check_incomplete_folder(weights_dir: Path, smoke_parameters, capsys, monkeypatch):
    (weights_dir / SMOKE_FOLDER / "unet/diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(weights_dir / SMOKE_FOLDER / "tokenizer")
    (weights_dir / "bespoke_punks.safetensors").unlink()
    found = by_what(check(Settings(weights_dir=weights_dir), expected=smoke_parameters))
    assert [f.status for f in found["unet"]] == ["missing"] and found["tokenizer"][0].status == "missing"
    assert found["lora"][0].status == "missing" and "--lora URL" in found["lora"][0].detail
    monkeypatch.setenv("PUNKS_WEIGHTS_DIR", str(weights_dir))
    assert main(["weights", "check"]) == 1
    out = capsys.readouterr().out
    assert "MISSING  lora" in out and "required file(s) missing or wrong" in out


def test_check_empty_folder_and_required_upscaler(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("PUNKS_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("PUNKS_UPSCALER", "realesrgan")
    assert main(["weights", "check"]) == 1
    out = capsys.readouterr().out
    assert "MISSING  base model" in out and "weights download" in out
    assert f"MISSING  realesrgan    {tmp_path / 'RealESRGAN_x2plus.pth'}: PUNKS_UPSCALER=realesrgan needs it" in out


def test_check_corrupt_files(weights_dir: Path, smoke_parameters):
    vae = weights_dir / SMOKE_FOLDER / "vae/diffusion_pytorch_model.safetensors"
    vae.write_bytes(vae.read_bytes()[:-100])  # a download cut short
    (weights_dir / SMOKE_FOLDER / "text_encoder/model.safetensors").write_bytes(b"<html>rate limited</html>")
    (weights_dir / "bespoke_punks.safetensors").write_bytes(b"\x00" * 64)
    (weights_dir / SMOKE_FOLDER / "model_index.json").write_text("{not json")
    tokenizer = weights_dir / SMOKE_FOLDER / "tokenizer/tokenizer.json"
    model = json.loads(tokenizer.read_text())
    model["model"]["vocab"] = dict(list(model["model"]["vocab"].items())[:1000])
    tokenizer.write_text(json.dumps(model))
    (weights_dir / "RealESRGAN_x2plus.pth").write_bytes(b"garbage")
    found = by_what(check(Settings(weights_dir=weights_dir), expected=smoke_parameters))
    assert found["vae"][0].status == "bad" and "truncated" in found["vae"][0].detail
    assert found["text_encoder"][0].status == "bad" and "not a safetensors file" in found["text_encoder"][0].detail
    assert found["lora"][0].status == "bad"
    assert found["base config"][0].status == "bad" and "not JSON" in found["base config"][0].detail
    assert found["tokenizer"][0].status == "bad" and "1000 tokens" in found["tokenizer"][0].detail
    assert found["unet"][0].status == "ok"
    if found["realesrgan"][0].detail.startswith("upscaler=realesrgan needs spandrel"):
        pytest.skip("spandrel not installed")
    assert found["realesrgan"][0].status == "bad" and not found["realesrgan"][0].fails  # optional unless configured


def test_check_compares_with_the_manifest(fake_hub, tmp_path: Path, smoke_parameters):
    settings = Settings(weights_dir=tmp_path)
    download(settings)
    unet = tmp_path / SMOKE_FOLDER / "unet/diffusion_pytorch_model.fp16.safetensors"
    data = bytearray(unet.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte changed: only the checksum sees it
    unet.write_bytes(bytes(data))
    assert not [f for f in check(settings, expected=smoke_parameters) if f.what == "base model"]
    (bad,) = [f for f in check(settings, verify=True, expected=smoke_parameters) if f.what == "base model"]
    assert bad.status == "bad" and "sha256 differs" in bad.detail and bad.path == unet
    unet.write_bytes(bytes(data[:-10]))
    findings = check(settings, expected=smoke_parameters)
    assert any(f.what == "base model" and "the manifest says" in f.detail for f in findings)
    assert any(f.what == "unet" and f.status == "bad" and "truncated" in f.detail for f in findings)


# --- the pinned SD1.5 source a pushed Cog model fetches at setup (service/weights/pinned.py) -----------------------


def test_the_pinned_files_are_what_weights_download_takes_each_with_its_sha256():
    chosen = set(filter_repo_objects(HUB_FILES, allow_patterns=list(SD15_PATTERNS)))
    assert set(SD15_SHA256) == chosen
    assert all(len(digest) == 64 and int(digest, 16) >= 0 for digest in SD15_SHA256.values())
    assert len(SD15_REVISION) == 40  # a commit, not a branch: the files cannot change under the checksums
    unet = next(f for f in sd15_files() if f.dest.endswith("unet/diffusion_pytorch_model.fp16.safetensors"))
    assert unet.source.url == (
        f"https://huggingface.co/{REPO}/resolve/{SD15_REVISION}/unet/diffusion_pytorch_model.fp16.safetensors"
    )
    assert unet.dest == f"{SD15_FOLDER}/unet/diffusion_pytorch_model.fp16.safetensors"


@pytest.fixture
def mirror(hub_repo: Path, served) -> tuple[str, dict[str, str]]:
    """The smoke model's fp16 diffusers files (what the patterns take) on the loopback server: URL, path -> sha256."""
    base, folder, _ = served
    files = {}
    for name in filter_repo_objects(
        [str(f.relative_to(hub_repo)) for f in hub_repo.rglob("*") if f.is_file()], allow_patterns=list(SD15_PATTERNS)
    ):
        (folder / "mirror" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(hub_repo / name, folder / "mirror" / name)
        files[name] = sha256((hub_repo / name).read_bytes())
    return f"{base}/mirror", files


def test_setup_fetch_resumes_a_cut_download_then_loads_the_fp16_folder(mirror, served, tmp_path: Path):
    url, files = mirror
    _, folder, handler = served
    (folder / "lora.safetensors").write_bytes(b"the default LoRA")
    unet = "/mirror/unet/diffusion_pytorch_model.fp16.safetensors"
    handler.cut_after[unet] = 100_000
    settings = Settings(
        weights_dir=tmp_path,
        fetch_at_setup=True,
        base_model_mirror=url,
        lora_url=f"{served[0]}/lora.safetensors",
        allow_smoke_model=False,
    )
    with pytest.raises(WeightsError) as failed:
        fetch_missing_weights(settings, files)
    message = str(failed.value)  # the file, the setting it came from, and what to do instead
    assert f"{SD15_FOLDER}/unet/diffusion_pytorch_model.fp16.safetensors" in message
    assert "PUNKS_BASE_MODEL_MIRROR" in message and "weights download" in message and "cog push" in message
    part = tmp_path / SD15_FOLDER / "unet/diffusion_pytorch_model.fp16.safetensors.part"
    assert part.stat().st_size == 100_000
    fetch_missing_weights(settings, files)  # resumed, not started over
    assert (unet, "bytes=100000-") in handler.seen
    assert (tmp_path / "bespoke_punks.safetensors").read_bytes() == b"the default LoRA"
    assert folder_variant(tmp_path / SD15_FOLDER) == "fp16"
    load_base_pipeline(tmp_path / SD15_FOLDER, tmp_path / SD15_FOLDER, torch.float32)
    seen = len(handler.seen)
    assert fetch_missing_weights(settings, files) == []  # all there: nothing fetched, nothing hashed again
    assert len(handler.seen) == seen


def test_a_file_that_is_not_the_pinned_one_fails_setup_and_is_removed(served, tmp_path: Path):
    """The real pinned checksums, against a mirror serving other bytes: refused, named, never kept."""
    base, folder, _ = served
    for path in SD15_SHA256:
        (folder / "wrong" / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / "wrong" / path).write_bytes(b"not SD1.5")
    settings = Settings(weights_dir=tmp_path, fetch_at_setup=True, base_model_mirror=f"{base}/wrong")
    with pytest.raises(WeightsError, match=r"12 of 12 weight files failed") as failed:
        fetch_missing_weights(settings)
    assert f"{SD15_FOLDER}/model_index.json: checksum mismatch" in str(failed.value)
    assert SD15_SHA256["vae/diffusion_pytorch_model.fp16.safetensors"] in str(failed.value)
    assert not list(tmp_path.rglob("*.json*"))


def test_nothing_is_fetched_when_weights_dir_holds_sd15(weights_dir: Path):
    settings = Settings(weights_dir=weights_dir, fetch_at_setup=True, base_model_mirror="https://unreachable.invalid")
    assert fetch_missing_weights(settings) == []


@pytest.mark.parametrize(
    ("pasted", "location"),
    [
        ("https://huggingface.co/o/r/blob/main/sub/x.safetensors", "hf://o/r@main/sub/x.safetensors"),
        ("huggingface.co/o/r/resolve/0a1b/x.safetensors?download=true", "hf://o/r@0a1b/x.safetensors"),
        ("https://hf.co/o/r/resolve/v1.0/x.safetensors", "hf://o/r@v1.0/x.safetensors"),
        ("o/r/x.safetensors", "hf://o/r/x.safetensors"),
        ("hf://o/r@v2/x.safetensors", "hf://o/r@v2/x.safetensors"),
        (
            "https://replicate.delivery/pbxt/abc/trained_model.tar",
            "https://replicate.delivery/pbxt/abc/trained_model.tar",
        ),
    ],
)
def test_lora_sources_in_the_forms_people_paste(pasted: str, location: str):
    digest = "ab" * 32
    assert Source.parse_pasted(pasted) == Source(location)
    assert Source.parse_pasted(f"{pasted}#sha256={digest}") == Source(location, digest)


@pytest.mark.parametrize("pasted", ["o/r", "huggingface.co/o/r", "ftp://h/x.safetensors", "o/r/x#sha256=12"])
def test_incomplete_pasted_sources_are_refused(pasted: str):
    with pytest.raises(ValueError, match="lora_weights: "):
        Source.parse_pasted(pasted, context="lora_weights")
