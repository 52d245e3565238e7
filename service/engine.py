"""The one engine every surface calls: load SD1.5 + the fused LoRA once, then turn descriptions
into snapped 24x24 sprites and 1024 px PNGs.

Requests are grouped into as few pipeline calls as possible. Each image has its own seeded
generator, so a seed gives the same image whether it was generated alone or in a batch.
"""

import logging
import secrets
import threading
import time
import unicodedata
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from itertools import groupby
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from service import config, snap_processes
from service.acceleration import accelerate, bucket_size
from service.config import Settings
from service.errors import RequestError
from service.loading import load_base_pipeline, set_scheduler
from service.lora.fuse import fuse_lora
from service.lora.inspect import LoraInfo, check_sd15_lora, inspect_sd15_lora
from service.lora.switch import LoraSwitcher, check_loras, find_loras
from service.pixelart import PixelArt, to_pixel_art
from service.prompts import NEGATIVE_PROMPT, PromptTokens, chunk_input_ids, tokenize_negative, tokenize_prompt
from service.upscale import Upscaler, load_upscaler
from service.weights.resolve import WeightsSource, resolve_weights

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (steps done, steps in total)


@dataclass(frozen=True)
class GenerationRequest:
    """Everything a user can ask for, under the same field names on every surface (CLI, HTTP, Cog).
    None means the configured default (Settings)."""

    prompt: str
    seed: int | None = None  # None: random; image i uses seed + i
    num_outputs: int = 1
    steps: int | None = None
    guidance: float | None = None
    lora: str | None = None  # a name from Engine.lora_names (a LoRA in loras_dir); None: the default LoRA
    upscaler: config.UpscalerName | None = None  # "realesrgan": also GeneratedImage.smooth
    output_size: int | None = None  # side of the delivered image
    integer_scale: bool | None = None  # cells of exactly floor(output_size / grid) px
    output_format: config.OutputFormat = "png"  # delivery only (service/delivery.py)
    return_sprites: bool = False  # delivery only: also the grid x grid sprites

    def check(self) -> None:
        """Raise RequestError naming the field for a value outside the shared bounds (service/config.py).

        Written for untrusted callers: a bool is not a number here, nor is NaN or a float seed."""
        _check_text("prompt", self.prompt, config.MAX_PROMPT_CHARS)
        if not any(unicodedata.category(char)[0] not in "CZ" for char in self.prompt):  # spaces, zero-width, controls
            raise RequestError("prompt", "must not be empty (it has no visible character)")
        if self.seed is not None:
            _check_number("seed", self.seed, 0, config.MAX_SEED, whole=True)
        _check_number("num_outputs", self.num_outputs, 1, config.MAX_IMAGES, whole=True)
        if self.steps is not None:
            _check_number("steps", self.steps, config.MIN_STEPS, config.MAX_STEPS, whole=True)
        if self.guidance is not None:
            _check_number("guidance", self.guidance, config.MIN_GUIDANCE, config.MAX_GUIDANCE)
        if self.output_size is not None:
            _check_number("output_size", self.output_size, config.MIN_OUTPUT_SIZE, config.MAX_OUTPUT_SIZE, whole=True)
        if self.lora is not None:
            _check_text("lora", self.lora, 200)
            if not self.lora.strip():
                raise RequestError("lora", "must be a LoRA name (a file stem in the LoRA folder)")
        _check_choice("upscaler", self.upscaler, config.UPSCALERS, optional=True)
        _check_choice("output_format", self.output_format, config.OUTPUT_FORMATS)
        if self.integer_scale is not None:
            _check_flag("integer_scale", self.integer_scale)
        _check_flag("return_sprites", self.return_sprites)


def _check_text(field: str, value: object, max_chars: int) -> None:
    if not isinstance(value, str):
        raise RequestError(field, "must be a string")
    if len(value) > max_chars:
        raise RequestError(field, f"at most {max_chars} characters, got {len(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(field, "must be valid Unicode text (no lone surrogates)") from None


def _check_number(field: str, value: object, low: float, high: float, whole: bool = False) -> None:
    kinds = (int,) if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise RequestError(field, "must be a whole number" if whole else "must be a number")
    if not low <= value <= high:  # also refuses NaN
        raise RequestError(field, f"must be between {low} and {high}")


def _check_flag(field: str, value: object) -> None:
    if not isinstance(value, bool):
        raise RequestError(field, "must be true or false")


def _check_choice(field: str, value: object, choices: tuple[str, ...], optional: bool = False) -> None:
    if (value is None and optional) or value in choices:
        return
    raise RequestError(field, f"must be one of {', '.join(choices)}")


@dataclass
class GeneratedImage:
    seed: int
    raw: Image.Image  # the 512x512 generation before snapping
    art: PixelArt  # sprite, upscaled image, palette, quality signals
    smooth: Image.Image | None = None  # upscaler "realesrgan": the raw generation upscaled to output_size


@dataclass
class GenerationResult:
    prompt: str  # the templated prompt actually encoded
    negative_prompt: str
    dropped_words: str  # the end of the user's words that did not fit CLIP's budget ("" if none)
    steps: int
    guidance: float
    images: list[GeneratedImage]
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Job:
    """One request resolved against the defaults: template applied, seeds chosen."""

    request_index: int
    tokens: PromptTokens
    seeds: tuple[int, ...]
    steps: int
    guidance: float
    lora: str | None
    upscaler: str
    output_size: int
    integer_scale: bool

    @property
    def batch_key(self) -> tuple:
        return (self.steps, self.guidance, self.tokens.chunk_count)

    @property
    def group_key(self) -> tuple:
        """Jobs sharing it share a pipeline call: same LoRA fused, same settings."""
        return (self.lora or "", *self.batch_key)


@dataclass
class Rendered:
    """One request between the engine's halves: its raw generations, not yet snapped (`Engine.finish`)."""

    job: _Job
    raws: list[Image.Image] = field(default_factory=list)  # one 512x512 generation per seed
    smooth: list[Image.Image] | None = None  # upscaler "realesrgan": each raw image upscaled on the GPU
    timings: dict[str, float] = field(default_factory=dict)


class Engine:
    def __init__(
        self,
        pipe: StableDiffusionPipeline,
        settings: Settings,
        weights: WeightsSource,
        lora: LoraInfo,
        loras: dict[str, Path] | None = None,
        switcher: LoraSwitcher | None = None,
        upscaler: Upscaler | None = None,
        text_encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        """`text_encoder`: what turns token ids into CLIP hidden states (accelerate's CUDA graphs); None: the
        pipeline's encoder, eagerly."""
        self.pipe = pipe
        self.settings = settings
        self.weights = weights
        self.lora = lora
        self.loras = dict(loras or {})  # the allow-list: name -> file; requests name a LoRA, never a path
        self._private_loras: dict[str, Path] = {}  # add_lora's (a caller's lora_url): never listed nor selectable
        self.switcher = switcher
        self.upscaler = upscaler  # loaded only with settings.upscaler == "realesrgan"
        self.device = torch.device(settings.torch_device)
        self._text_encoder = text_encoder or (lambda ids: pipe.text_encoder(ids)[0])
        self._negative_embeddings: dict[tuple, torch.Tensor] = {}
        count = settings.snap_process_count
        self._snap_processes = snap_processes.start(count) if count else None
        self._running = _Running()  # renders and in-process snaps now: a snap goes to a process only beside others

    def close(self) -> None:
        """Stop the snap processes (PUNKS_SNAP_PROCESSES), if any; the engine snaps no more afterwards."""
        if self._snap_processes is not None:
            self._snap_processes.shutdown(cancel_futures=True)

    @property
    def lora_names(self) -> list[str]:
        """The LoRAs a request may name besides the default one (`default_lora`, or no name)."""
        return sorted(self.loras)

    @property
    def default_lora(self) -> str:
        """The name of the LoRA served when a request names none (its file stem)."""
        return self.weights.lora.stem

    @property
    def is_smoke(self) -> bool:
        """True when no real weights were found and the random smoke model stands in: images are noise."""
        return self.weights.is_smoke

    @classmethod
    def load(cls, settings: Settings | None = None, loras: dict[str, Path] | None = None) -> "Engine":
        """`loras`: the selectable LoRAs (name -> file); default: every *.safetensors in settings.loras_path()."""
        settings = settings or Settings()
        stages = _Stopwatch()
        weights = resolve_weights(settings)
        dtype = getattr(torch, settings.torch_dtype_name)
        upscaler = None  # first, so that a wrong file fails before the long model load
        if settings.upscaler == "realesrgan":
            upscaler = load_upscaler(settings.realesrgan_path(), settings.torch_device, dtype)
            log.info("upscaler: %s", upscaler.describe())
            stages.lap("upscaler")
        pipe = load_base_pipeline(weights.base_model, weights.config_dir, dtype)
        set_scheduler(pipe, settings.scheduler)
        stages.lap("read SD1.5")
        pipe.to(settings.torch_device)  # before fusing: the fuse's matmuls are much faster on the GPU
        stages.lap(f"to {settings.torch_device}")
        loras = find_loras(settings.loras_path()) if loras is None else loras
        switcher = None
        lora = inspect_sd15_lora(weights.lora, settings.expected_lora_rank)
        if loras or settings.lora_url_cache_size:  # lora_url: LoRAs are added at run time (add_lora)
            if settings.compile or settings.fp8:
                mode = "compile" if settings.compile else "fp8"
                raise ValueError(
                    f"{mode}: switching LoRAs (loras_dir, or lora_url with PUNKS_LORA_URL_CACHE_SIZE > 0) is not "
                    f"supported with PUNKS_{mode.upper()} (the switcher rewrites fp16 weights in place); set "
                    f"PUNKS_LORA_URL_CACHE_SIZE=0 and leave {settings.loras_path()} empty"
                )
            selectable = check_loras(pipe, loras, settings.expected_lora_rank)  # a wrong file fails now
            switcher = LoraSwitcher(pipe, settings.lora_scale, [lora, *selectable.values()])
            log.info(
                "selectable LoRAs: %s (base copy of %.0f MB kept for switching)",
                ", ".join(sorted(loras)) or "none yet (lora_url)",
                switcher.base_bytes / 1e6,
            )
            switcher.fuse(lora.path)
        else:
            fuse_lora(pipe, lora, settings.lora_scale)
        stages.lap("fuse LoRA")
        text_encoder = accelerate(pipe, settings)
        pipe.set_progress_bar_config(disable=True)
        engine = cls(pipe, settings, weights, lora, loras, switcher, upscaler, text_encoder)
        if settings.warmup:
            engine.warm_up()
            stages.lap("warm-up")
        log.info(
            "loaded %s + %s (%s) on %s/%s in %s%s",
            weights.base_model,
            weights.lora,
            lora.describe(),
            settings.torch_device,
            settings.torch_dtype_name,
            stages,
            " [SMOKE MODEL: images are not meaningful]" if weights.is_smoke else "",
        )
        return engine

    def lora_warnings(self, info: LoraInfo) -> list[str]:
        """What the guard warns about in a LoRA that it lets through (a rank other than the one that worked)."""
        return check_sd15_lora(info, self.settings.expected_lora_rank)

    def add_lora(self, name: str, path: Path) -> LoraInfo:
        """Make the LoRA file at `path` renderable as `name` at run time (Cog's lora_url), after the guard start-up
        runs on every LoRA (family, rank, keys, shapes, finite values): LoraError with the guard's message when it
        does not fit. The name stays private: not in lora_names, and check_request refuses it, so only the
        request the surface rewrote after its own check (predict.py) renders with it.

        Call it on the GPU thread (the batcher's executor), as render is: registering is then never interleaved
        with a batch."""
        if self.switcher is None:
            raise RuntimeError("adding LoRAs needs the switcher: start with PUNKS_LORA_URL_CACHE_SIZE > 0")
        if name in self.loras or name in self._private_loras:
            raise ValueError(f"a LoRA named {name!r} is already served")
        info = check_loras(self.pipe, {name: path}, self.settings.expected_lora_rank)[name]
        self.switcher.add(info)
        self._private_loras = self._private_loras | {name: path}
        return info

    def remove_lora(self, name: str) -> None:
        """Stop serving a LoRA added with add_lora; its file may be deleted once this returns. On the GPU thread,
        like add_lora: a batch that uses it has been rendered by then."""
        path = self._private_loras[name]
        self._private_loras = {known: file for known, file in self._private_loras.items() if known != name}
        if path not in self._private_loras.values() and self.switcher is not None:
            self.switcher.remove(path)
            self._negative_embeddings = {key: e for key, e in self._negative_embeddings.items() if key[0] != path}

    def warm_up(self) -> None:
        """Generate once per batch bucket (compile: record each CUDA graph) so no user request pays for it."""
        started = time.perf_counter()
        sizes = self.settings.batch_buckets if self.settings.compile else (1,)
        for size in sizes:
            warm_ups = [GenerationRequest("warm-up", seed=0, num_outputs=n, steps=2) for n in request_sizes(size)]
            jobs = [self._resolve(i, request, self.check_request(request)) for i, request in enumerate(warm_ups)]
            self._run_pipeline(jobs, None, 0, 2)
        if self.upscaler is not None:
            size = self.settings.generation_size
            self.upscaler.upscale(Image.new("RGB", (size, size)), self.settings.output_size)
        if self._snap_processes is not None:  # start every snap process now (each one imports numpy and Pillow)
            blank = Image.new("RGB", (self.settings.generation_size,) * 2)
            list(self._snap_processes.map(to_pixel_art, [blank] * self.settings.snap_process_count))
        log.info("warm-up (batch sizes %s) took %.1fs", sizes, time.perf_counter() - started)

    def check_request(self, request: GenerationRequest) -> PromptTokens:
        """Raise RequestError for a request this engine cannot serve (bounds, LoRA, upscaler, a prompt CLIP would
        drop wholly); return its templated tokens, which render uses instead of tokenizing again.

        Surfaces call it before queueing, so a bad request is a client error, never a failed batch. Only the
        served LoRAs resolve here, not the private ones of add_lora (render accepts those)."""
        return self._check(request, private_loras=False)

    def _check(self, request: GenerationRequest, private_loras: bool) -> PromptTokens:
        request.check()
        self._lora_file(request.lora, private_loras)
        if request.upscaler == "realesrgan" and self.upscaler is None:
            raise RequestError("upscaler", "realesrgan is not enabled on this server (PUNKS_UPSCALER=realesrgan)")
        tokens = tokenize_prompt(self.pipe.tokenizer, request.prompt)
        if tokens.dropped_words == " ".join(request.prompt.split()):  # nothing of the user's words would be drawn
            raise RequestError("prompt", "none of its words fits CLIP's 225-token budget; use fewer or shorter words")
        return tokens

    def generate(self, request: GenerationRequest, progress: Progress | None = None) -> GenerationResult:
        return self.generate_batch([request], progress)[0]

    def generate_batch(
        self, requests: Sequence[GenerationRequest], progress: Progress | None = None
    ) -> list[GenerationResult]:
        """Both halves on the calling thread (CLI, Cog); the API overlaps them instead (service/batcher.py)."""
        return [self.finish(rendered) for rendered in self.render(requests, progress)]

    def render(self, requests: Sequence[GenerationRequest], progress: Progress | None = None) -> list[Rendered]:
        """The GPU half: generate every request's raw images with as few pipeline calls as their settings
        allow (plus the Real-ESRGAN upscale, also on the GPU). Run it on the thread that loaded the engine."""
        self._running.join()
        try:
            return self._render(requests, progress)
        finally:
            self._running.leave()

    def _render(self, requests: Sequence[GenerationRequest], progress: Progress | None) -> list[Rendered]:
        checked = [self._check(request, private_loras=True) for request in requests]  # all, before rendering
        jobs = [
            self._resolve(index, request, tokens)
            for index, (request, tokens) in enumerate(zip(requests, checked, strict=True))
        ]
        rendered = [Rendered(job) for job in jobs]  # job.request_index is its place in this list
        timings = {"pipeline_s": 0.0}  # shared by the batch's requests: they waited for the same calls
        total_steps = sum(job.steps for job in {job.group_key: job for job in jobs}.values())
        done_steps = 0
        active_first = lambda j: (self._lora_file(j.lora, True) != self.active_lora, j.group_key)  # noqa: E731
        for _, grouped in groupby(sorted(jobs, key=active_first), key=lambda j: j.group_key):
            group = list(grouped)
            if switched := self._use_lora(group[0].lora):
                timings["lora_switch_s"] = timings.get("lora_switch_s", 0.0) + switched
            started = time.perf_counter()
            raws = iter(self._run_pipeline(group, progress, done_steps, total_steps))
            timings["pipeline_s"] += time.perf_counter() - started
            done_steps += group[0].steps
            for job in group:
                rendered[job.request_index].raws = [next(raws) for _ in job.seeds]
            if smooth := [job for job in group if job.upscaler == "realesrgan"]:
                assert self.upscaler is not None  # check_request refuses realesrgan when none is loaded
                started = time.perf_counter()
                for job in smooth:
                    result = rendered[job.request_index]
                    result.smooth = [self.upscaler.upscale(raw, job.output_size) for raw in result.raws]
                timings["upscale_s"] = timings.get("upscale_s", 0.0) + time.perf_counter() - started
        for result in rendered:
            result.timings = dict(timings)
        return rendered

    def finish(self, rendered: Rendered) -> GenerationResult:
        """The CPU half: snap each raw image to the grid and upscale it. Pure numpy and Pillow, so any
        thread can run it while the GPU renders the next batch."""
        started = time.perf_counter()
        job = rendered.job
        smooth: Sequence[Image.Image | None] = rendered.smooth or [None] * len(rendered.raws)
        images = [
            GeneratedImage(seed=seed, raw=raw, art=self._snap(raw, job), smooth=smoothed)
            for seed, raw, smoothed in zip(job.seeds, rendered.raws, smooth, strict=True)
        ]
        timings = rendered.timings | {"postprocess_s": time.perf_counter() - started}
        return GenerationResult(
            prompt=job.tokens.text,
            negative_prompt=NEGATIVE_PROMPT,
            dropped_words=job.tokens.dropped_words,
            steps=job.steps,
            guidance=job.guidance,
            images=images,
            timings={name: round(seconds, 4) for name, seconds in timings.items()},
        )

    def _resolve(self, index: int, request: GenerationRequest, tokens: PromptTokens) -> _Job:
        first_seed = request.seed if request.seed is not None else secrets.randbelow(config.MAX_SEED + 1)
        if tokens.dropped_words:
            log.warning("prompt too long for CLIP; dropped: %r", tokens.dropped_words)
        return _Job(
            request_index=index,
            tokens=tokens,
            seeds=tuple((first_seed + offset) % (config.MAX_SEED + 1) for offset in range(request.num_outputs)),
            steps=request.steps if request.steps is not None else self.settings.steps,
            guidance=request.guidance if request.guidance is not None else self.settings.guidance,
            lora=request.lora,
            upscaler=request.upscaler or self.settings.upscaler,
            output_size=request.output_size if request.output_size is not None else self.settings.output_size,
            integer_scale=request.integer_scale if request.integer_scale is not None else self.settings.integer_scale,
        )

    @torch.inference_mode()
    def _encode(self, token_rows: list[tuple[int, ...]], chunks: int) -> torch.Tensor:
        """CLIP hidden states of each prompt, its 77-token chunks side by side: (batch, 77*chunks, width)."""
        ids = [row for tokens in token_rows for row in chunk_input_ids(self.pipe.tokenizer, tokens, chunks)]
        hidden = self._text_encoder(torch.tensor(ids, device=self.device))
        return hidden.reshape(len(token_rows), -1, hidden.shape[-1])

    def _negative(self, chunks: int) -> torch.Tensor:
        """The fixed negative prompt never changes: encode it once per chunk count."""
        key = (self.active_lora, chunks)  # the text encoder changes with the fused LoRA
        if key not in self._negative_embeddings:
            self._negative_embeddings[key] = self._encode([tokenize_negative(self.pipe.tokenizer).token_ids], chunks)
        return self._negative_embeddings[key]

    def _lora_file(self, name: str | None, private: bool) -> Path:
        """The file behind a request's LoRA name: the default LoRA (no name, or its name), a served one, or with
        `private` one of add_lora's. RequestError listing the names a request may use otherwise."""
        if name is None or name == self.default_lora:
            return self.weights.lora
        if name in self.loras:
            return self.loras[name]
        if private and name in self._private_loras:
            return self._private_loras[name]
        allowed = ", ".join([self.default_lora, *self.lora_names])
        raise RequestError("lora", f"unknown LoRA {name[:80]!r}; allowed: {allowed}")

    @property
    def active_lora(self) -> Path | None:
        """The fused LoRA's file; None while a switch that failed left the base weights (LoraSwitcher.fuse)."""
        return self.switcher.active if self.switcher is not None else self.weights.lora

    def _use_lora(self, name: str | None) -> float:
        """Fuse the LoRA a group needs (a no-op when it already is); returns the seconds it took."""
        path = self._lora_file(name, private=True)
        if path == self.active_lora:
            return 0.0
        assert self.switcher is not None  # without one, only the fused LoRA resolves (load, add_lora)
        return self.switcher.switch(path)

    def _run_pipeline(self, group: list[_Job], progress: Progress | None, done: int, total: int) -> list[Image.Image]:
        steps, guidance, chunks = group[0].batch_key
        token_rows = [job.tokens.token_ids for job in group for _ in job.seeds]
        seeds = [seed for job in group for seed in job.seeds]
        wanted = len(seeds)
        if self.settings.compile:  # pad to a compiled batch size; the extra rows are dropped below
            padding = bucket_size(wanted, self.settings.batch_buckets) - wanted
            token_rows += token_rows[-1:] * padding
            seeds += [0] * padding
        prompt_embeds = self._encode(token_rows, chunks)
        negative_embeds = self._negative(chunks).expand(len(seeds), -1, -1)

        def on_step_end(pipe, step: int, timestep, tensors: dict) -> dict:
            if progress is not None:
                progress(done + step + 1, total)
            return tensors

        size = self.settings.generation_size
        output = self.pipe(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
            callback_on_step_end=on_step_end,
            output_type="pt",  # 0..1, still on the device: the 8-bit conversion below is done there too
        )
        return to_pil(output.images[:wanted])

    def _snap(self, raw: Image.Image, job: _Job) -> PixelArt:
        """With snap processes, in a worker only while a render or another snap runs here: the GIL they would share
        is what workers are for. A lone image snaps on this thread, where it waits for no hand-off (H200 call 4: batch-1
        p50 0.228 s snapping in workers, 0.2075 s on threads; bench/results/2026-12-02-NVIDIA-H200.json)."""
        s = self.settings
        snap = partial(
            to_pixel_art, grid=s.grid, size=job.output_size, max_colors=s.max_colors, integer_scale=job.integer_scale
        )
        processes = self._snap_processes
        if processes is None:
            return snap(raw)
        if self._running.join(only_if_idle=True):
            try:
                return snap(raw)
            finally:
                self._running.leave()
        try:
            return processes.submit(snap, raw).result()  # this thread waits without holding the GIL
        except BrokenProcessPool:  # a worker died (killed, out of memory): the pool takes no more work
            if self._snap_processes is processes:
                log.error("a snap process died; snapping on this process's threads from now on", exc_info=True)
                self._snap_processes = None
                processes.shutdown(wait=False, cancel_futures=True)
            return snap(raw)


class _Running:
    """How many renders and in-process snaps of one engine run right now, across its threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def join(self, only_if_idle: bool = False) -> bool:
        """Count one more, unless `only_if_idle` and something runs; True when counted (then call leave)."""
        with self._lock:
            if only_if_idle and self._count:
                return False
            self._count += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._count -= 1


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """PIL images from the pipeline's (n, 3, h, w) 0..1 tensor, as diffusers' output_type="pil" makes them
    (x 255 in float32, rounded half to even: the same bytes) but converted on the device, so the CPU copies half
    the bytes and does no float work: 2.8 vs 3.8 ms per 512 px image on the GPU thread of an H200 host
    (bench/results/2026-12-03-pipeline-overhead-NVIDIA-H200.json)."""
    pixels = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(image) for image in pixels]


def request_sizes(images: int) -> list[int]:
    """Image counts of the fewest requests that fill a batch of `images`: a batch beyond one request's
    MAX_IMAGES is several requests grouped, as the batcher groups them."""
    full, rest = divmod(images, config.MAX_IMAGES)
    return [config.MAX_IMAGES] * full + ([rest] if rest else [])


class _Stopwatch:
    """Start-up stages and their seconds, for the one log line that says where start-up time goes."""

    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.laps: list[tuple[str, float]] = []

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps.append((stage, now - self.last))
        self.last = now

    def __str__(self) -> str:
        stages = ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in self.laps)
        return f"{self.last - self.started:.1f}s ({stages})"
