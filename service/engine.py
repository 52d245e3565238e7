"""The one engine every surface calls: load SD1.5 + the fused LoRA once, then turn descriptions
into snapped 24x24 sprites and 1024 px PNGs.

Requests are grouped into as few pipeline calls as possible. Each image has its own seeded
generator, so a seed gives the same image whether it was generated alone or in a batch.
"""

import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import groupby

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from service import config
from service.config import Settings
from service.loading import WeightsSource, fuse_lora, load_base_pipeline, resolve_weights, set_scheduler
from service.lora import LoraInfo
from service.pixelart import PixelArt, to_pixel_art
from service.prompts import PromptTokens, chunk_input_ids, tokenize_negative, tokenize_prompt

log = logging.getLogger(__name__)

MAX_SEED = 2**32 - 1
Progress = Callable[[int, int], None]  # (steps done, steps in total)


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    seed: int | None = None
    num_images: int = 1
    steps: int | None = None  # None: the configured default
    guidance: float | None = None

    def check(self) -> None:
        """Raise ValueError naming the field, for surfaces that do not validate on their own (the CLI)."""
        if not self.prompt.strip():
            raise ValueError("prompt: must not be empty")
        if len(self.prompt) > config.MAX_PROMPT_CHARS:
            raise ValueError(f"prompt: at most {config.MAX_PROMPT_CHARS} characters, got {len(self.prompt)}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed: must be between 0 and {MAX_SEED}")
        if not 1 <= self.num_images <= config.MAX_IMAGES:
            raise ValueError(f"num_images: must be between 1 and {config.MAX_IMAGES}")
        if self.steps is not None and not config.MIN_STEPS <= self.steps <= config.MAX_STEPS:
            raise ValueError(f"steps: must be between {config.MIN_STEPS} and {config.MAX_STEPS}")
        if self.guidance is not None and not config.MIN_GUIDANCE <= self.guidance <= config.MAX_GUIDANCE:
            raise ValueError(f"guidance: must be between {config.MIN_GUIDANCE} and {config.MAX_GUIDANCE}")


@dataclass
class GeneratedImage:
    seed: int
    raw: Image.Image  # the 512x512 generation before snapping
    art: PixelArt  # sprite, upscaled image, palette, quality signals


@dataclass
class GenerationResult:
    prompt: str  # the templated prompt actually encoded
    negative_prompt: str
    dropped_words: str  # the end of the user's words that did not fit CLIP's budget ("" if none)
    steps: int
    guidance: float
    images: list[GeneratedImage]
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-ready description of the result (everything but the pixels)."""
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "truncated": bool(self.dropped_words),
            "dropped_words": self.dropped_words,
            "steps": self.steps,
            "guidance": self.guidance,
            "images": [
                {"seed": image.seed, "palette": image.art.palette, "quality": image.art.quality.as_dict()}
                for image in self.images
            ],
            "timings": self.timings,
        }


@dataclass(frozen=True)
class _Job:
    """One request resolved against the defaults: template applied, seeds chosen."""

    request_index: int
    tokens: PromptTokens
    seeds: tuple[int, ...]
    steps: int
    guidance: float

    @property
    def batch_key(self) -> tuple:
        return (self.steps, self.guidance, self.tokens.chunk_count)


class Engine:
    def __init__(self, pipe: StableDiffusionPipeline, settings: Settings, weights: WeightsSource, lora: LoraInfo):
        self.pipe = pipe
        self.settings = settings
        self.weights = weights
        self.lora = lora
        self.device = torch.device(settings.torch_device)
        self._negative_embeddings: dict[int, torch.Tensor] = {}

    @classmethod
    def load(cls, settings: Settings | None = None) -> "Engine":
        settings = settings or Settings()
        started = time.perf_counter()
        weights = resolve_weights(settings)
        dtype = getattr(torch, settings.torch_dtype_name)
        pipe = load_base_pipeline(weights.base_model, weights.config_dir, dtype)
        set_scheduler(pipe, settings.scheduler)
        lora = fuse_lora(pipe, weights.lora, settings.lora_scale, settings.expected_lora_rank)
        pipe.to(settings.torch_device)
        pipe.set_progress_bar_config(disable=True)
        log.info(
            "loaded %s + %s (%s) on %s/%s in %.1fs%s",
            weights.base_model, weights.lora, lora.describe(), settings.torch_device, settings.torch_dtype_name,
            time.perf_counter() - started, " [SMOKE MODEL: images are not meaningful]" if weights.is_smoke else "",
        )
        return cls(pipe, settings, weights, lora)

    def generate(self, request: GenerationRequest, progress: Progress | None = None) -> GenerationResult:
        return self.generate_batch([request], progress)[0]

    def generate_batch(self, requests: Sequence[GenerationRequest], progress: Progress | None = None) -> list[GenerationResult]:
        """Generate several requests with as few pipeline calls as their settings allow."""
        for request in requests:
            request.check()
        jobs = [self._resolve(index, request) for index, request in enumerate(requests)]
        images: dict[int, list[GeneratedImage]] = {job.request_index: [] for job in jobs}
        timings = {"pipeline_s": 0.0, "postprocess_s": 0.0}
        total_steps = sum(job.steps for job in {job.batch_key: job for job in jobs}.values())
        done_steps = 0
        for _, group in groupby(sorted(jobs, key=lambda j: j.batch_key), key=lambda j: j.batch_key):
            group = list(group)
            started = time.perf_counter()
            raws = self._run_pipeline(group, progress, done_steps, total_steps)
            timings["pipeline_s"] += time.perf_counter() - started
            done_steps += group[0].steps
            started = time.perf_counter()
            rows = iter(raws)
            for job in group:
                for seed in job.seeds:
                    raw = next(rows)
                    images[job.request_index].append(GeneratedImage(seed=seed, raw=raw, art=self._postprocess(raw)))
            timings["postprocess_s"] += time.perf_counter() - started
        return [
            GenerationResult(
                prompt=job.tokens.text,
                negative_prompt=tokenize_negative(self.pipe.tokenizer).text,
                dropped_words=job.tokens.dropped_words,
                steps=job.steps,
                guidance=job.guidance,
                images=images[job.request_index],
                timings={k: round(v, 4) for k, v in timings.items()},
            )
            for job in jobs
        ]

    def _resolve(self, index: int, request: GenerationRequest) -> _Job:
        first_seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        tokens = tokenize_prompt(self.pipe.tokenizer, request.prompt)
        if tokens.dropped_words:
            log.warning("prompt too long for CLIP; dropped: %r", tokens.dropped_words)
        return _Job(
            request_index=index,
            tokens=tokens,
            seeds=tuple((first_seed + offset) % (MAX_SEED + 1) for offset in range(request.num_images)),
            steps=request.steps if request.steps is not None else self.settings.steps,
            guidance=request.guidance if request.guidance is not None else self.settings.guidance,
        )

    @torch.inference_mode()
    def _encode(self, token_rows: list[tuple[int, ...]], chunks: int) -> torch.Tensor:
        """CLIP hidden states of each prompt, its 77-token chunks side by side: (batch, 77*chunks, width)."""
        ids = [row for tokens in token_rows for row in chunk_input_ids(self.pipe.tokenizer, tokens, chunks)]
        hidden = self.pipe.text_encoder(torch.tensor(ids, device=self.device))[0]
        return hidden.reshape(len(token_rows), -1, hidden.shape[-1])

    def _negative(self, chunks: int) -> torch.Tensor:
        """The fixed negative prompt never changes: encode it once per chunk count."""
        if chunks not in self._negative_embeddings:
            self._negative_embeddings[chunks] = self._encode([tokenize_negative(self.pipe.tokenizer).token_ids], chunks)
        return self._negative_embeddings[chunks]

    def _run_pipeline(self, group: list[_Job], progress: Progress | None, done: int, total: int) -> list[Image.Image]:
        steps, guidance, chunks = group[0].batch_key
        token_rows = [job.tokens.token_ids for job in group for _ in job.seeds]
        seeds = [seed for job in group for seed in job.seeds]
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
        )
        return output.images

    def _postprocess(self, raw: Image.Image) -> PixelArt:
        s = self.settings
        return to_pixel_art(raw, grid=s.grid, size=s.output_size, max_colors=s.max_colors, integer_scale=s.integer_scale)
