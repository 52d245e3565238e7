"""Settings, grouped by concern: one class per group below (model and weights, generation defaults, acceleration,
batching, Cog's lora_weights, the download policy, `weights download`, the HTTP service, Ray Serve), and `Settings`, all
of them in one object for every surface. Each field is an environment variable prefixed PUNKS_ (for example
PUNKS_WEIGHTS_DIR, PUNKS_LORA_SCALE), whichever group it is in; the defaults below are the documented ones
(docs/configuration.md is generated from these classes: `python -m devtools.config_doc`)."""

import ipaddress
from functools import cached_property
from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Scheduler = Literal["dpm++", "euler_a", "euler", "ddim", "pndm"]
SCHEDULERS = get_args(Scheduler)
UPSCALERS = ("nearest", "realesrgan")
UpscalerName = Literal["nearest", "realesrgan"]
OutputFormat = Literal["png", "webp"]  # both lossless: a lossy codec would smear the flat cells
OUTPUT_FORMATS = get_args(OutputFormat)

# SD1.5's small config JSONs and CLIP tokenizer files, shipped in the package so that single-file checkpoints
# load with no hub access.
SD15_CONFIG_DIR = Path(__file__).parent / "sd15_config"
CLIP_VOCABULARY_SIZE = 49408  # entries of SD1.5's CLIP tokenizer

# Default names inside weights_dir: the Settings paths below, `weights download|check` and the start-up messages
# all use these, so a file is looked for where it is put.
SD15_FOLDER = "stable-diffusion-v1-5"  # diffusers layout
SD15_FILE = "v1-5-pruned-emaonly.safetensors"  # single-file checkpoint
LORA_FILE = "bespoke_punks.safetensors"
LORAS_FOLDER = "loras"
REALESRGAN_FILE = "RealESRGAN_x2plus.pth"
MANIFEST_FILE = "manifest.json"  # what `weights download` wrote, with sizes and sha256
COMPILE_ARTIFACTS_FILE = "torch-compile-artifacts.bin"

# Bounds shared by every surface (CLI, FastAPI, Cog) so they reject the same inputs.
MIN_STEPS, MAX_STEPS = 1, 100
MIN_GUIDANCE, MAX_GUIDANCE = 0.0, 20.0
MAX_IMAGES = 4
MAX_PROMPT_CHARS = 500
MAX_SEED = 2**32 - 1
MIN_OUTPUT_SIZE, MAX_OUTPUT_SIZE = 24, 4096
MIN_LORA_SCALE, MAX_LORA_SCALE = 0.0, 2.0
# Pixel-art controls and variations (service/sprite_controls.py, service/images.py).
MAX_PALETTE_COLORS = 64
MIN_STRENGTH, MAX_STRENGTH, DEFAULT_STRENGTH = 0.0, 1.0, 0.6  # img2img: the share of the steps run on the image
MAX_IMAGE_BYTES = 8 * 2**20  # an input image's file
MAX_IMAGE_SIDE = 2048  # px, either side of an input image; Pillow's decompression-bomb limit is its square


class _Group(BaseSettings):
    """A group of settings: each reads its fields from the PUNKS_* environment on its own, or as part of Settings."""

    model_config = SettingsConfigDict(env_prefix="PUNKS_", frozen=True)


class ModelSettings(_Group):
    """Model and weights: which SD1.5 model and LoRAs are loaded, from where, on which device."""

    weights_dir: Path = Field(Path("weights"), description="Folder holding the base model and the LoRA.")
    base_model: Path | None = Field(
        None,
        description="SD1.5 diffusers folder or single .safetensors/.ckpt file. "
        "Default: weights_dir/stable-diffusion-v1-5 (folder) or weights_dir/v1-5-pruned-emaonly.safetensors.",
    )
    lora: Path | None = Field(None, description="Kohya LoRA file. Default: weights_dir/bespoke_punks.safetensors.")
    loras_dir: Path | None = Field(
        None,
        description="Folder of further LoRAs a request may pick by file stem (`lora`). Default: weights_dir/loras.",
    )
    lora_scale: float = Field(1.0, ge=MIN_LORA_SCALE, le=MAX_LORA_SCALE, description="Strength the LoRA is fused at.")
    expected_lora_rank: int = Field(32, description="The rank that worked (dim 32 / alpha 16); others only warn.")
    allow_smoke_model: bool = Field(
        True, description="With no real weights, fall back (loudly) to fallback_model (demo or smoke)."
    )
    fallback_model: Literal["demo", "smoke"] = Field(
        "demo",
        description="What stands in (loudly) for missing weights when allow_smoke_model is on: 'demo', the small "
        "model trained on generated portraits in devtools/demo_model (the smoke model where it is absent), or "
        "'smoke', the tiny random model (noise; quicker: the tests use it).",
    )
    smoke_dir: Path = Field(Path(".cache/smoke-model"), description="Where the smoke model is built and kept.")
    device: str = Field("auto", description="'auto' (cuda when present, else cpu), 'cuda', 'cuda:1', 'cpu'.")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="'auto': float16 on CUDA, float32 on CPU."
    )
    realesrgan_weights: Path | None = Field(
        None, description="RealESRGAN x2plus/x4plus .pth. Default: weights_dir/RealESRGAN_x2plus.pth."
    )

    def base_model_candidates(self) -> list[Path]:
        if self.base_model is not None:
            return [self.base_model]
        return [self.weights_dir / SD15_FOLDER, self.weights_dir / SD15_FILE]

    def lora_path(self) -> Path:
        return self.lora if self.lora is not None else self.weights_dir / LORA_FILE

    def loras_path(self) -> Path:
        return self.loras_dir if self.loras_dir is not None else self.weights_dir / LORAS_FOLDER

    def realesrgan_path(self) -> Path:
        return self.realesrgan_weights if self.realesrgan_weights is not None else self.weights_dir / REALESRGAN_FILE

    @cached_property
    def torch_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @cached_property
    def torch_dtype_name(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "float16" if self.torch_device.startswith("cuda") else "float32"


class GenerationSettings(_Group):
    """Generation defaults: what a request gets for the fields it leaves out, and the snapped sprite's shape."""

    steps: int = Field(25, ge=MIN_STEPS, le=MAX_STEPS, description="Default denoising steps.")
    guidance: float = Field(7.5, ge=MIN_GUIDANCE, le=MAX_GUIDANCE, description="Default classifier-free guidance.")
    scheduler: Scheduler = Field("dpm++", description="Sampler: " + ", ".join(SCHEDULERS) + ".")
    generation_size: int = Field(512, description="SD1.5 resolution the LoRA was trained at.")
    grid: int = Field(24, description="Cells per side of the sprite.")
    output_size: int = Field(
        1024,
        ge=MIN_OUTPUT_SIZE,
        le=MAX_OUTPUT_SIZE,
        description="Default side of the delivered image (a request may ask for another).",
    )
    integer_scale: bool = Field(
        False, description="Deliver floor(output_size/grid) px cells (1008 for 1024) instead of 42/43 px cells."
    )
    max_colors: int | None = Field(None, ge=2, le=256, description="Optional cap on the sprite's palette.")
    upscaler: UpscalerName = Field(
        "nearest",
        description="'nearest': only the exact, lossless upscale of the snapped sprite. 'realesrgan': also a smooth "
        "upscale of the raw 512 generation (loaded at start; needs requirements-upscale.txt).",
    )


class AccelerationSettings(_Group):
    """Acceleration: torch.compile, FP8, their caches, and the warm-up that keeps compiling off the requests."""

    compile: bool = Field(
        False,
        description="torch.compile the UNet and VAE decoder with CUDA graphs (mode reduce-overhead). CUDA only. "
        "Start-up compiles once per batch-size bucket; the compile cache is kept on disk (compile_cache_dir).",
    )
    fp8: bool = Field(
        False,
        description="Opt-in: the UNet's attention and feed-forward linear layers in FP8 (torchao, dynamic per-tensor "
        "scales for activations and weights), after the LoRA is fused. CUDA with compute capability 8.9+ (Ada, "
        "Hopper) and the fp8 extra (torchao). Not exact: its drift from fp16 is visible. Not faster: eager it is 3-4x "
        "slower than fp16, and with compile its start-up did not finish within 9 minutes on an H200, even for one "
        "batch bucket (bench/results/2026-12-02-fp8-NVIDIA-H200.json). Not with switchable LoRAs.",
    )
    compile_cache_dir: Path = Field(
        Path(".cache/torch-compile"),
        description="Inductor/Triton cache, reused by the next start on this disk (a fresh "
        "machine: compile_artifacts).",
    )
    compile_artifacts: Path | None = Field(
        None,
        description="Portable compile cache (torch.compiler.save_cache_artifacts) loaded before compiling, so a "
        "fresh machine (a Replicate cold boot) skips most of the compile. Made by `python -m service compile-cache` "
        "on the GPU type and image that will serve. Default: weights_dir/torch-compile-artifacts.bin.",
    )
    batch_buckets: tuple[int, ...] = Field(
        (1, 2, 4),
        description="With compile: image counts warmed up at start; a batch is padded up to the next bucket so "
        "that no request ever waits for a new compile. The largest must hold max_batch_size and a 4-image request.",
    )
    warmup: bool = Field(True, description="Run one tiny generation at start so the first request is not slow.")


class LoraUrlSettings(_Group):
    """Cog's lora_weights: LoRAs a caller names by URL, downloaded once into a bounded cache."""

    lora_url_cache_size: int = Field(
        0,
        ge=0,
        description="Cog's `lora_weights` input: how many downloaded LoRA files are kept (least recently used go "
        "first). 0: lora_weights is refused. Above 0 the engine keeps a CPU copy of the base weights for switching "
        "(service/lora/switch.py), which torch.compile does not support yet.",
    )
    lora_url_cache_dir: Path = Field(
        Path(".cache/loras"), description="Where the `lora_weights` downloads are kept (emptied of them at start)."
    )


class DownloadSettings(_Group):
    """Download policy (service/weights/policy.py) of every URL the service fetches: these bound a caller's
    `lora_weights` and Cog's `image` and `input_images` (each of those two capped at its own size, not
    download_max_bytes); the operator's own URLs (PUNKS_WEIGHTS_URLS, `weights download`) keep the timeouts and the rate
    floor but may use http, reach internal hosts and be up to 16 GiB."""

    download_allow_http: bool = Field(False, description="Let a caller's URLs use plain http:// (https only when off).")
    download_allowed_networks: tuple[str, ...] = Field(
        (),
        description="Networks (CIDR, as a JSON list: '[\"10.8.0.0/16\"]') a caller's URL may reach although they are "
        "not public, e.g. an internal mirror. Loopback, private, link-local, CGNAT, multicast and reserved "
        "addresses are refused otherwise, on every redirect.",
    )
    download_max_bytes: int = Field(
        256 * 1024 * 1024, ge=1, description="Largest `lora_weights` file (an SD1.5 LoRA of rank 32 is ~40 MB)."
    )
    download_connect_timeout_s: float = Field(10.0, gt=0, description="Connecting to a download's host.")
    download_stall_timeout_s: float = Field(
        10.0, gt=0, description="Longest wait for a download's next bytes; also how soon a cancelled one stops."
    )
    download_deadline_s: float = Field(120.0, gt=0, description="Whole download of a caller's URL, redirects included.")
    download_min_bytes_per_s: int = Field(
        64 * 1024, ge=0, description="Slowest average rate a download may keep once the stall timeout has passed."
    )
    download_workers: int = Field(
        4, ge=1, le=64, description="`lora_weights` downloads at once (their own threads); more wait for a free one."
    )

    @field_validator("download_allowed_networks")
    @classmethod
    def _networks(cls, networks: tuple[str, ...]) -> tuple[str, ...]:
        for network in networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"not a network in CIDR form: {network[:60]!r}") from None
        return networks


class WeightsDownloadSettings(_Group):
    """Weights download (`python -m service weights download`): where the model files come from."""

    base_model_repo: str = Field(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        description="Hugging Face repo `weights download` fetches SD1.5 from (diffusers layout, fp16 files only).",
    )
    lora_url: str | None = Field(
        None,
        description="Where `weights download` gets the LoRA: https://... or hf://owner/repo/path, "
        "optionally followed by #sha256=<hex>.",
    )
    realesrgan_url: str = Field(
        "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.2.1/RealESRGAN_x2plus.pth",
        description="Where `weights download --realesrgan` gets the upscaler (same forms as PUNKS_LORA_URL).",
    )
    fetch_at_setup: bool = Field(
        False,
        description="Cog's setup: download what weights_dir lacks before loading: SD1.5 from its pinned source "
        "(service/weights/pinned.py; sha256-checked, resumable) and the LoRA from PUNKS_LORA_URL. cog.yaml sets it.",
    )
    base_model_mirror: str | None = Field(
        None,
        description="With fetch_at_setup: an https:// folder holding SD1.5's pinned files in the diffusers layout "
        "(model_index.json, unet/..., same sha256) to fetch instead of the Hugging Face Hub at the pinned revision.",
    )
    weights_urls: str = Field(
        "",
        description="Cog's setup (and `python -m service.weights.fetch`): `dest=source` pairs, separated by commas "
        "or spaces, fetched into weights_dir before anything else; dest relative to weights_dir, source as for "
        "PUNKS_LORA_URL, e.g. 'bespoke_punks.safetensors=https://host/punks.safetensors#sha256=<hex>'. The HTTP "
        "server does not read it.",
    )


class BatchingSettings(_Group):
    """Batching (the HTTP service and Cog): how requests are grouped into pipeline calls and snapped."""

    max_batch_size: int = Field(
        4,
        ge=1,
        description="Most images one pipeline call generates for grouped requests. On the H100, 8 gives only "
        "5% more images/s than 4 for twice the wait, and 4 leaves room to snap one batch while the next renders "
        "(bench/results/2026-11-25-NVIDIA-H100-80GB-HBM3-batch8.json).",
    )
    snap_processes: int | None = Field(
        None,
        ge=0,
        le=64,
        description="Worker processes that snap the rendered images (the CPU half) while the GPU renders the next "
        "batch (an image finished while nothing else runs is snapped in the serving process, with no hand-off); "
        "0: threads of the serving process, where the snapping's many small numpy calls hold the GIL that "
        "the GPU thread needs between graph replays (on an H200, 8 clients got 6.84 images/s with threads, 7.68 "
        "with 4 processes: bench/results/2026-12-02-NVIDIA-H200.json). Unset: max_batch_size on CUDA, 0 on CPU "
        "(rendering there is far slower than snapping).",
    )
    max_batch_wait_ms: float = Field(
        0.0,
        ge=0,
        description="How long the first queued request waits for others to share its pipeline call. 0: a request "
        "to an idle GPU starts at once, and requests that arrive while it renders share the next call anyway (as "
        "Triton's dynamic batcher does by default), where a 10 ms wait makes a lone request wait for nobody. The "
        "cost: clients that all start at once get a first batch of one (on an H200, 8 clients: 12 engine calls "
        "instead of 10, 7.41 images/s against 7.79 with 10 ms; bench/results/2026-12-02-NVIDIA-H200.json). Set it "
        "for bursty traffic.",
    )
    max_queue: int = Field(64, ge=1, description="Requests allowed to wait for the GPU; beyond it the API answers 429.")


class HttpSettings(_Group):
    """HTTP service (service/http/, `python -m service serve`): limits, auth, timeouts, shutdown."""

    request_timeout_s: float = Field(
        120.0, gt=0, description="A request not answered by then gets 504 (and leaves the queue if still waiting)."
    )
    max_body_bytes: int = Field(
        16 * 1024, ge=1, description="Larger request bodies get 413 (the routes that take an image: below)."
    )
    max_image_body_bytes: int = Field(
        12 * 2**20,
        ge=1,
        description="The body limit of the routes that take an image (POST /v1/generate, /v1/images/variations, "
        "/sdapi/v1/img2img): an image file of up to 8 MiB in base64 or a form.",
    )
    api_token: SecretStr | None = Field(
        None,
        description="When set, generation requires `Authorization: Bearer <token>`; health endpoints stay open. "
        "Unset it to turn auth off: an empty or blank value is refused at start.",
    )
    trusted_hosts: tuple[str, ...] | None = Field(
        None,
        description="Host header values the HTTP service answers (JSON list; '*.example.com' patterns; others get "
        "400). Unset, without a token: a request that arrives on a loopback address must name 127.0.0.1, localhost "
        "or [::1] (no DNS rebinding against a local server); any host otherwise.",
    )
    max_header_bytes: int = Field(
        16 * 1024,
        ge=1024,
        description="Request line plus headers beyond which `python -m service serve` answers 431 and closes.",
    )
    host: str = Field(
        "127.0.0.1", description="Address `python -m service serve` listens on (the Docker image: 0.0.0.0)."
    )
    port: int = Field(8000, ge=0, le=65535, description="Port `python -m service serve` listens on.")
    body_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A request body not fully received by then gets 408 and its connection is closed "
        "(uvicorn itself waits for a slow body forever).",
    )
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="An idle keep-alive connection is closed after this.")
    limit_concurrency: int = Field(
        256,
        ge=1,
        description="Open connections plus running requests beyond which uvicorn answers 503 at once "
        "(bounds file descriptors; keep it above max_queue).",
    )
    shutdown_timeout_s: float = Field(
        5.0,
        ge=0,
        description="On SIGTERM new requests get 503 at once; the queued ones have this long to be answered, "
        "then get 503. The process exits once the batch on the GPU returns (under Docker's default `stop -t 10`).",
    )

    @field_validator("api_token")
    @classmethod
    def _token_not_blank(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and not token.get_secret_value().strip():
            raise ValueError(
                "PUNKS_API_TOKEN is set but empty: set a token, or unset the variable to serve without auth"
            )
        return token


class RaySettings(_Group):
    """Ray Serve (service/http/ray_app.py, `serve run deploy/serve.yaml`): one replica = one engine on one GPU."""

    ray_min_replicas: int = Field(1, ge=0, description="Ray Serve: fewest replicas the autoscaler keeps.")
    ray_max_replicas: int = Field(1, ge=1, description="Ray Serve: most replicas (at most one per GPU).")
    ray_target_ongoing_requests: float = Field(
        4.0, gt=0, description="Ray Serve autoscaling: ongoing requests per replica it scales towards."
    )
    ray_max_ongoing_requests: int = Field(
        8,
        ge=1,
        description="Ray Serve: requests one replica holds at once (its batcher's queue); more wait at the proxy. "
        "Keep it at most max_queue.",
    )
    ray_max_queued_requests: int = Field(
        64,
        ge=-1,
        description="Ray Serve: requests waiting at each proxy for a replica; beyond it the proxy answers 429 "
        "with Retry-After (plain text, not the JSON of the service's own 429). -1: no bound.",
    )
    ray_num_gpus: float | None = Field(
        None,
        ge=0,
        description="Ray Serve: GPUs per replica. Default: 1 when device is cuda, or auto and CUDA (or a GPU in "
        "the Ray cluster) is present; else 0 (CPU).",
    )
    ray_num_cpus: float = Field(1.0, ge=0, description="Ray Serve: CPUs reserved per replica.")


class Settings(
    ModelSettings,
    GenerationSettings,
    AccelerationSettings,
    BatchingSettings,
    LoraUrlSettings,
    DownloadSettings,
    WeightsDownloadSettings,
    HttpSettings,
    RaySettings,
):
    """Every group in one object, as every surface reads its settings (`Settings()`, `settings.steps`)."""

    @model_validator(mode="after")
    def _buckets_hold_every_batch(self) -> "Settings":
        largest = max(MAX_IMAGES, self.max_batch_size)
        if self.compile and max(self.batch_buckets, default=0) < largest:
            raise ValueError(
                f"batch_buckets: with compile the largest bucket must hold {largest} images (max_batch_size and a "
                f"{MAX_IMAGES}-image request), got {self.batch_buckets}; a bigger batch would compile on a request"
            )
        return self

    @cached_property
    def snap_process_count(self) -> int:
        if self.snap_processes is not None:
            return self.snap_processes
        return self.max_batch_size if self.torch_device.startswith("cuda") else 0

    def compile_artifacts_path(self) -> Path:
        if self.compile_artifacts is not None:
            return self.compile_artifacts
        return self.weights_dir / COMPILE_ARTIFACTS_FILE


# The groups in the order docs/configuration.md lists them (devtools/config_doc.py).
GROUPS: tuple[type[_Group], ...] = (
    ModelSettings,
    GenerationSettings,
    AccelerationSettings,
    BatchingSettings,
    HttpSettings,
    RaySettings,
    LoraUrlSettings,
    DownloadSettings,
    WeightsDownloadSettings,
)
