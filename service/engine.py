"""The one engine every surface calls: load SD1.5 + the fused LoRA once, then turn descriptions
into snapped 24x24 sprites and 1024 px PNGs.

Requests are grouped into as few pipeline calls as possible. Each image has its own seeded
generator, so a seed gives the same image whether it was generated alone or in a batch.

The engine loads (Engine.load) and renders (render: the GPU half; finish: the CPU half). What it delegates:
requests and their bounds (service/requests.py), the LoRAs it serves (service/lora/registry.py) and where snaps
run (service/snap_processes.py). GenerationRequest and request_sizes are re-exported here for the surfaces.
"""

import copy
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from service import config, samplers
from service.acceleration import accelerate, bucket_size
from service.config import Settings
from service.errors import RequestError
from service.images import initial_image
from service.loading import OneDeviceImg2ImgPipeline, load_base_pipeline, set_scheduler
from service.lora.inspect import LoraInfo
from service.lora.registry import LoraRegistry
from service.pixelart import PixelArt
from service.prompts import PromptTokens, chunk_input_ids, tokenize_negative, tokenize_prompt
from service.requests import GenerationRequest, request_sizes
from service.snap_processes import Snapper
from service.sprite_controls import palette_colours
from service.upscale import Upscaler, load_upscaler
from service.weights.resolve import WeightsSource, resolve_weights

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (steps done, steps in total)
__all__ = [
    *("Engine", "GeneratedImage", "GenerationResult", "Progress", "Rendered", "to_pil"),
    *("GenerationRequest", "request_sizes"),  # service/requests.py's, for the surfaces that import them from here
]


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
    sampler: str  # its A1111 name (service/samplers.py)
    images: list[GeneratedImage]
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Job:
    """One request resolved against the defaults: template applied, seeds chosen."""

    request_index: int
    tokens: PromptTokens
    negative: PromptTokens  # the fixed negative prompt, plus the request's own words
    seeds: tuple[int, ...]
    steps: int
    guidance: float
    sampler: str  # a name of samplers.SAMPLERS
    lora: str | None
    lora_scale: float
    upscaler: str
    output_size: int
    integer_scale: bool
    # pixel-art controls, applied by the snap
    palette: tuple[str, ...] | None
    background: str
    # a variation: the picture it starts from (generation size) and the share of the steps run from it
    image: Image.Image | None = None
    strength: float | None = None

    @property
    def chunks(self) -> int:
        """CLIP chunks of this job's prompt and negative prompt, which are encoded side by side."""
        return max(self.tokens.chunk_count, self.negative.chunk_count)

    @property
    def batch_key(self) -> tuple:
        variation = (self.strength is not None, self.strength or 0.0)  # sortable: None is no number
        return (self.steps, self.guidance, self.sampler, self.chunks, variation)

    @property
    def denoising_steps(self) -> int:
        """The steps the pipeline runs: a variation skips the first (1 - strength) of them, as diffusers does."""
        return self.steps if self.strength is None else min(int(self.steps * self.strength), self.steps)

    @property
    def group_key(self) -> tuple:
        """Jobs sharing it share a pipeline call: same LoRA fused at the same scale, same settings."""
        return (self.lora or "", self.lora_scale, *self.batch_key)


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
        loras: LoraRegistry,
        upscaler: Upscaler | None = None,
        text_encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        """`loras`: the LoRAs fused into `pipe` and selectable by name; `text_encoder`: what turns token ids into
        CLIP hidden states (accelerate's CUDA graphs); None: the pipeline's encoder, eagerly."""
        self.pipe = pipe
        self.settings = settings
        self.weights = weights
        self.loras = loras
        self.upscaler = upscaler  # loaded only with settings.upscaler == "realesrgan"
        self.device = torch.device(settings.torch_device)
        self._text_encoder = text_encoder or (lambda ids: pipe.text_encoder(ids)[0])
        self._negative_embeddings: dict[tuple, torch.Tensor] = {}
        self._fixed_negative = tokenize_negative(pipe.tokenizer)
        self.snapper = Snapper(settings.grid, settings.max_colors, settings.snap_process_count)

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
        registry = LoraRegistry.load(pipe, settings, weights.lora, loras)
        stages.lap("fuse LoRA")
        text_encoder = accelerate(pipe, settings)
        pipe.set_progress_bar_config(disable=True)
        engine = cls(pipe, settings, weights, registry, upscaler, text_encoder)
        if settings.warmup:
            engine.warm_up()
            stages.lap("warm-up")
        log.info(
            "loaded %s + %s (%s) on %s/%s in %s%s",
            weights.base_model,
            weights.lora,
            registry.default.describe(),
            settings.torch_device,
            settings.torch_dtype_name,
            stages,
            " [SMOKE MODEL: images are not meaningful]" if weights.is_smoke else "",
        )
        return engine

    def close(self) -> None:
        """Stop the snap processes (PUNKS_SNAP_PROCESSES), if any; the engine snaps no more afterwards."""
        self.snapper.close()

    @property
    def is_smoke(self) -> bool:
        """True when no real weights were found and the random smoke model stands in: images are noise."""
        return self.weights.is_smoke

    # --- the LoRAs, as the surfaces ask about them (service/lora/registry.py does the work) ---

    @property
    def lora_names(self) -> list[str]:
        """The LoRAs a request may name besides the default one (`default_lora`, or no name)."""
        return self.loras.names

    @property
    def default_lora(self) -> str:
        """The name of the LoRA served when a request names none (its file stem)."""
        return self.loras.default_name

    def lora_warnings(self, info: LoraInfo) -> list[str]:
        """What the guard warns about in a LoRA that it lets through (a rank other than the one that worked)."""
        return self.loras.warnings(info)

    def add_lora(self, name: str, path: Path) -> LoraInfo:
        """Make the LoRA file at `path` renderable as `name` at run time (Cog's lora_weights), after the guard start-up
        runs on every LoRA (family, rank, keys, shapes, finite values): LoraError with the guard's message when it
        does not fit. The name stays private: not in lora_names, and check_request refuses it, so only the
        request the surface rewrote after its own check (predict.py) renders with it.

        Call it on the GPU thread (the batcher's executor), as render is: registering is then never interleaved
        with a batch."""
        return self.loras.add(name, path)

    def remove_lora(self, name: str) -> None:
        """Stop serving a LoRA added with add_lora; its file may be deleted once this returns. On the GPU thread,
        like add_lora: a batch that uses it has been rendered by then."""
        if (gone := self.loras.remove(name)) is not None:
            self._negative_embeddings = {key: e for key, e in self._negative_embeddings.items() if key[0] != gone}

    # --- rendering ---

    def warm_up(self) -> None:
        """Generate once per batch bucket (compile: record each CUDA graph) so no user request pays for it."""
        started = time.perf_counter()
        sizes = self.settings.batch_buckets if self.settings.compile else (1,)
        for size in sizes:
            warm_ups = [
                GenerationRequest("warm-up", seed=0, num_outputs=n, num_inference_steps=2) for n in request_sizes(size)
            ]
            jobs = [self._resolve(i, request, self.check_request(request)) for i, request in enumerate(warm_ups)]
            self._run_pipeline(jobs, None, 0, 2)
        if self.upscaler is not None:
            size = self.settings.generation_size
            self.upscaler.upscale(Image.new("RGB", (size, size)), self.settings.output_size)
        self.snapper.warm_up(self.settings.generation_size)
        log.info("warm-up (batch sizes %s) took %.1fs", sizes, time.perf_counter() - started)

    def check_request(self, request: GenerationRequest) -> PromptTokens:
        """Raise RequestError for a request this engine cannot serve (bounds, LoRA, upscaler, a prompt CLIP would
        drop wholly); return its templated tokens, which render uses instead of tokenizing again.

        Surfaces call it before queueing, so a bad request is a client error, never a failed batch. Only the
        served LoRAs resolve here, not the private ones of add_lora (render accepts those)."""
        return self._check(request, private_loras=False)

    def _check(self, request: GenerationRequest, private_loras: bool) -> PromptTokens:
        request.check()
        self.loras.file(request.lora, private_loras)
        if request.lora_scale is not None:
            self.loras.check_scale(request.lora_scale)
        if request.upscaler == "realesrgan" and self.upscaler is None:
            raise RequestError("upscaler", "realesrgan is not enabled on this server (PUNKS_UPSCALER=realesrgan)")
        tokens = tokenize_prompt(self.pipe.tokenizer, request.prompt)
        if tokens.dropped_words == " ".join(request.prompt.split()):  # nothing of the user's words would be drawn
            raise RequestError("prompt", "none of its words fits CLIP's 225-token budget; use fewer or shorter words")
        if request.image is not None:
            steps = request.num_inference_steps if request.num_inference_steps is not None else self.settings.steps
            strength = request.strength if request.strength is not None else config.DEFAULT_STRENGTH
            if int(steps * strength) < 1:
                raise RequestError(
                    "strength", f"leaves no step to run: a variation runs int(steps x strength) of the {steps} steps"
                )
        return tokens

    @property
    def default_sampler(self) -> str:
        """The sampler of requests that name none: PUNKS_SCHEDULER's, by its A1111 name."""
        return samplers.DEFAULTS[self.settings.scheduler]

    def sampler_of(self, request: GenerationRequest) -> str:
        """The A1111 name of the sampler `request` renders with (an alias resolved, None the default)."""
        return samplers.lookup(request.sampler).name if request.sampler is not None else self.default_sampler

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
        with self.snapper.rendering():
            return self._render(requests, progress)

    def _render(self, requests: Sequence[GenerationRequest], progress: Progress | None) -> list[Rendered]:
        checked = [self._check(request, private_loras=True) for request in requests]  # all, before rendering
        jobs = [
            self._resolve(index, request, tokens)
            for index, (request, tokens) in enumerate(zip(requests, checked, strict=True))
        ]
        rendered = [Rendered(job) for job in jobs]  # job.request_index is its place in this list
        timings = {"pipeline_s": 0.0}  # shared by the batch's requests: they waited for the same calls
        total_steps = sum(job.denoising_steps for job in {job.group_key: job for job in jobs}.values())
        done_steps = 0
        active_first = lambda j: (not self.loras.is_active(j.lora, j.lora_scale), j.group_key)  # noqa: E731
        for _, grouped in groupby(sorted(jobs, key=active_first), key=lambda j: j.group_key):
            group = list(grouped)
            if switched := self.loras.use(group[0].lora, group[0].lora_scale):
                timings["lora_switch_s"] = timings.get("lora_switch_s", 0.0) + switched
            started = time.perf_counter()
            raws = iter(self._run_pipeline(group, progress, done_steps, total_steps))
            timings["pipeline_s"] += time.perf_counter() - started
            done_steps += group[0].denoising_steps
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
            GeneratedImage(
                seed=seed,
                raw=raw,
                art=self.snapper.snap(raw, job.output_size, job.integer_scale, job.palette, job.background),
                smooth=smoothed,
            )
            for seed, raw, smoothed in zip(job.seeds, rendered.raws, smooth, strict=True)
        ]
        timings = rendered.timings | {"postprocess_s": time.perf_counter() - started}
        return GenerationResult(
            prompt=job.tokens.text,
            negative_prompt=job.negative.text,
            dropped_words=job.tokens.dropped_words,
            steps=job.steps,
            guidance=job.guidance,
            sampler=job.sampler,
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
            negative=tokenize_negative(self.pipe.tokenizer, request.negative_prompt),
            seeds=tuple((first_seed + offset) % (config.MAX_SEED + 1) for offset in range(request.num_outputs)),
            steps=request.num_inference_steps if request.num_inference_steps is not None else self.settings.steps,
            guidance=request.guidance_scale if request.guidance_scale is not None else self.settings.guidance,
            sampler=self.sampler_of(request),
            lora=request.lora,
            lora_scale=request.lora_scale if request.lora_scale is not None else self.settings.lora_scale,
            upscaler=request.upscaler or self.settings.upscaler,
            output_size=request.output_size if request.output_size is not None else self.settings.output_size,
            integer_scale=request.integer_scale if request.integer_scale is not None else self.settings.integer_scale,
            palette=palette_colours(request.palette) if request.palette is not None else None,
            background=request.background,
            image=None
            if request.image is None
            else initial_image(request.image, self.settings.generation_size, self.settings.grid),
            strength=None
            if request.image is None
            else (request.strength if request.strength is not None else config.DEFAULT_STRENGTH),
        )

    @torch.inference_mode()
    def _encode(self, token_rows: list[tuple[int, ...]], chunks: int) -> torch.Tensor:
        """CLIP hidden states of each prompt, its 77-token chunks side by side: (batch, 77*chunks, width)."""
        ids = [row for tokens in token_rows for row in chunk_input_ids(self.pipe.tokenizer, tokens, chunks)]
        hidden = self._text_encoder(torch.tensor(ids, device=self.device))
        return hidden.reshape(len(token_rows), -1, hidden.shape[-1])

    def _negative(self, rows: list[PromptTokens], chunks: int) -> torch.Tensor:
        """The negative prompt of each row. The fixed one alone never changes: it is encoded once per chunk count
        (and fused LoRA); a request's own negative words are encoded with its batch."""
        if any(row.token_ids != self._fixed_negative.token_ids for row in rows):
            return self._encode([row.token_ids for row in rows], chunks)
        key = (self.loras.active, self.loras.active_scale, chunks)  # the text encoder changes with the fused LoRA
        if key not in self._negative_embeddings:
            self._negative_embeddings[key] = self._encode([self._fixed_negative.token_ids], chunks)
        return self._negative_embeddings[key].expand(len(rows), -1, -1)

    def _run_pipeline(self, group: list[_Job], progress: Progress | None, done: int, total: int) -> list[Image.Image]:
        steps, guidance, sampler, chunks, _ = group[0].batch_key
        strength = group[0].strength
        token_rows = [job.tokens.token_ids for job in group for _ in job.seeds]
        negative_rows = [job.negative for job in group for _ in job.seeds]
        seeds = [seed for job in group for seed in job.seeds]
        starts = [job.image for job in group for _ in job.seeds]  # variations: the pictures they start from
        wanted = len(seeds)
        if self.settings.compile:  # pad to a compiled batch size; the extra rows are dropped below
            padding = bucket_size(wanted, self.settings.batch_buckets) - wanted
            token_rows += token_rows[-1:] * padding
            negative_rows += negative_rows[-1:] * padding
            seeds += [0] * padding
            starts += starts[-1:] * padding
        prompt_embeds = self._encode(token_rows, chunks)
        negative_embeds = self._negative(negative_rows, chunks)

        def on_step_end(pipe, step: int, timestep, tensors: dict) -> dict:
            if progress is not None:
                progress(done + step + 1, total)
            return tensors

        size = self.settings.generation_size
        # A scheduler of its own for this call (schedulers keep per-call state), on a shallow copy of the pipeline:
        # the shared pipeline and its default scheduler are never changed, and the UNet, VAE and their CUDA
        # graphs are the same objects (a scheduler's steps run outside them).
        scheduler = samplers.SAMPLERS[sampler].build(self.pipe.scheduler.config)
        common = dict(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
            callback_on_step_end=on_step_end,
            output_type="pt",  # 0..1, still on the device: the 8-bit conversion below is done there too
        )
        if strength is None:
            pipe = copy.copy(self.pipe)
            object.__setattr__(pipe, "scheduler", scheduler)
            output = pipe(height=size, width=size, **common)
        else:  # diffusers' img2img pipeline over the same modules: no second copy of any weight
            variations = OneDeviceImg2ImgPipeline(
                **self.pipe.components | {"scheduler": scheduler}, requires_safety_checker=False
            )
            variations.set_progress_bar_config(disable=True)
            output = variations(image=starts, strength=strength, **common)
        return to_pil(output.images[:wanted])


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """PIL images from the pipeline's (n, 3, h, w) 0..1 tensor, as diffusers' output_type="pil" makes them
    (x 255 in float32, rounded half to even: the same bytes) but converted on the device, so the CPU copies half
    the bytes and does no float work: 2.8 vs 3.8 ms per 512 px image on the GPU thread of an H200 host
    (bench/results/2026-12-03-pipeline-overhead-NVIDIA-H200.json)."""
    pixels = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(image) for image in pixels]


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
