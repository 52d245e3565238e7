"""Load SD1.5 offline from a diffusers folder or a single checkpoint file, and set its scheduler.

A file that cannot be loaded fails at start-up with a message naming it, so that a bad deployment never
turns into bad images.
"""

from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)

from service.config import CLIP_VOCABULARY_SIZE, SD15_CONFIG_DIR
from service.errors import WeightsError
from service.weights.resolve import SINGLE_FILE_SUFFIXES, folder_variant

SCHEDULERS = {  # config.Scheduler's names
    "dpm++": DPMSolverMultistepScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "euler": EulerDiscreteScheduler,
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
}


class OneDevice:
    """For diffusers' SD1.5 pipelines in a service that keeps every model on one device (it never offloads)."""

    unet: torch.nn.Module

    @property
    def _execution_device(self) -> torch.device:
        """Where the UNet's weights are. diffusers' own answer (and ModelMixin.device) walks every module of every
        component looking for offload hooks, on every call, on the GPU thread: on the CI machine's CPU a call spent
        9.1 ms outside the models with it and 2.3 ms without (bench/results/2026-12-03-pipeline-overhead-cpu.json)."""
        return next(self.unet.parameters()).device


class OneDevicePipeline(OneDevice, StableDiffusionPipeline):
    """Text to image."""


class OneDeviceImg2ImgPipeline(OneDevice, StableDiffusionImg2ImgPipeline):
    """Variations of an image (the engine builds it from the loaded pipeline's components)."""


def load_base_pipeline(path: Path, config_dir: Path, dtype: torch.dtype) -> OneDevicePipeline:
    """Load SD1.5 offline from a diffusers folder or a single checkpoint file, and check its tokenizer."""
    try:
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise WeightsError(f"{path} is not a diffusers folder: model_index.json is missing")
            pipe = OneDevicePipeline.from_pretrained(
                path,
                dtype=dtype,
                local_files_only=True,
                safety_checker=None,
                requires_safety_checker=False,
                feature_extractor=None,
                variant=folder_variant(path),  # the safety checker's; not downloaded
            )
        elif path.suffix in SINGLE_FILE_SUFFIXES:
            pipe = OneDevicePipeline.from_single_file(
                str(path),
                config=str(config_dir),
                dtype=dtype,
                local_files_only=True,
                safety_checker=None,
                requires_safety_checker=False,
            )
        else:
            raise WeightsError(f"{path}: expected a diffusers folder or a {'/'.join(SINGLE_FILE_SUFFIXES)} file")
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        if isinstance(error, WeightsError):
            raise
        raise WeightsError(f"could not load SD1.5 from {path}: {error}") from error
    if len(pipe.tokenizer) != CLIP_VOCABULARY_SIZE:
        raise WeightsError(
            f"{path}: tokenizer has {len(pipe.tokenizer)} entries, SD1.5's CLIP tokenizer has {CLIP_VOCABULARY_SIZE}; "
            f"copy {SD15_CONFIG_DIR / 'tokenizer'} into the model's tokenizer/ folder"
        )
    return pipe


def set_scheduler(pipe: StableDiffusionPipeline, name: str) -> None:
    pipe.scheduler = SCHEDULERS[name].from_config(pipe.scheduler.config)
