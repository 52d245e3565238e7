"""Serve several LoRAs from one loaded base model by re-fusing.

After fuse + unload the LoRA delta is baked into the weights, so a switch cannot "unfuse" exactly
(subtracting the delta again leaves fp16 rounding behind). Instead the base weights of every layer a
kohya SD1.x LoRA can touch are copied to CPU once, before the first fuse; a switch restores those
layers and fuses the other LoRA through the same checked path as at start-up (every module checked,
fused, no wrappers left). Switching back therefore reproduces the first fuse bit for bit.

Cost: a CPU copy of the targeted layers (~350M parameters, ~0.7 GB in fp16 for SD1.5) and per switch
a host-to-device copy of them plus one fuse.
"""

import logging
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from service.lora.fuse import kohya_targets
from service.lora.fuse import check_lora_matches_model, fuse_lora
from service.lora.inspect import LoraError, LoraInfo, check_sd15_lora, inspect_lora

log = logging.getLogger(__name__)
LORA_SUFFIX = ".safetensors"


def find_loras(folder: Path) -> dict[str, Path]:
    """The allow-list: file stem -> path for every *.safetensors directly in `folder` (none if it is missing)."""
    if not folder.is_dir():
        return {}
    return {path.stem: path for path in sorted(folder.iterdir()) if path.suffix == LORA_SUFFIX and path.is_file()}


def check_loras(pipe: StableDiffusionPipeline, loras: dict[str, Path], expected_rank: int) -> dict[str, LoraInfo]:
    """Header-check every selectable LoRA at start-up, so a wrong file fails now and not on a request."""
    infos = {}
    for name, path in loras.items():
        info = inspect_lora(path)
        for warning in check_sd15_lora(info, expected_rank):
            log.warning(warning)
        check_lora_matches_model(pipe, info)
        infos[name] = info
    return infos


class LoraSwitcher:
    """Keeps the base weights of the LoRA-targeted layers and re-fuses on demand."""

    def __init__(self, pipe: StableDiffusionPipeline, scale: float, expected_rank: int):
        self.pipe = pipe
        self.scale = scale
        self.expected_rank = expected_rank
        self._base = {name: module.weight.detach().to("cpu", copy=True) for name, module in kohya_targets(pipe).items()}
        self.active: Path | None = None

    @property
    def base_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._base.values())

    def fuse(self, path: Path) -> LoraInfo:
        """Fuse `path` onto the pristine base weights (the first fuse, at load, skips the restore)."""
        if self.active is not None:
            self.restore()
        self.active = None  # if fusing fails, the weights are the base ones, not a known LoRA
        info = fuse_lora(self.pipe, path, self.scale, self.expected_rank)
        self.active = path
        return info

    @torch.no_grad()
    def restore(self) -> None:
        targets = kohya_targets(self.pipe)
        if set(targets) != set(self._base):
            raise LoraError("the model's LoRA-targeted layers changed since start-up; cannot restore base weights")
        for name, module in targets.items():
            module.weight.copy_(self._base[name])

    def switch(self, path: Path) -> float:
        """Make `path` the fused LoRA; returns the seconds it took (0 when it already is)."""
        if self.active == path:
            return 0.0
        started = time.perf_counter()
        self.fuse(path)
        if self.pipe.device.type == "cuda":
            torch.cuda.synchronize(self.pipe.device)
        seconds = time.perf_counter() - started
        log.info("switched LoRA to %s in %.2fs", path.name, seconds)
        return seconds
