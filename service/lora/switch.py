"""Serve several LoRAs from one loaded base model by re-fusing.

After fuse + unload the LoRA delta is baked into the weights, so a switch cannot "unfuse" exactly
(subtracting the delta again leaves fp16 rounding behind). Instead the base weights of every layer a
kohya SD1.x LoRA can touch are copied to CPU once, before the first fuse; a switch restores those
layers and fuses the other LoRA through the same checked path as at start-up (every module checked against
the model, fused, no wrappers left). Switching back therefore reproduces the first fuse bit for bit.

Every selectable file is inspected once, at start-up (check_loras): a wrong file fails then, not on a request,
and a switch uses that inspection instead of reading the file's header again. A LoRA added at run time (`add`,
Cog's lora_weights) is checked the same way before it is added.

Cost: a CPU copy of the targeted layers (~350M parameters, ~0.7 GB in fp16 for SD1.5) and per switch
a host-to-device copy of them plus one fuse.
"""

import logging
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from service.lora.fuse import check_lora_matches_model, fuse_lora, kohya_targets
from service.lora.inspect import LoraError, LoraInfo, inspect_sd15_lora

log = logging.getLogger(__name__)
LORA_SUFFIX = ".safetensors"


def find_loras(folder: Path) -> dict[str, Path]:
    """The allow-list: file stem -> path for every *.safetensors directly in `folder` (none if it is missing)."""
    if not folder.is_dir():
        return {}
    return {path.stem: path for path in sorted(folder.iterdir()) if path.suffix == LORA_SUFFIX and path.is_file()}


def check_loras(pipe: StableDiffusionPipeline, loras: dict[str, Path], expected_rank: int) -> dict[str, LoraInfo]:
    """Inspect every selectable LoRA and match it against the model: name -> what the switcher will fuse."""
    infos = {}
    for name, path in loras.items():
        info = inspect_sd15_lora(path, expected_rank)
        check_lora_matches_model(pipe, info)
        infos[name] = info
    return infos


class LoraSwitcher:
    """Keeps the base weights of the LoRA-targeted layers and re-fuses, on demand, one of the LoRAs it was given, at
    the scale asked for (a request's lora_scale; `scale` when none is given)."""

    def __init__(self, pipe: StableDiffusionPipeline, scale: float, loras: Iterable[LoraInfo]):
        self.pipe = pipe
        self.scale = scale
        self.loras = {info.path: info for info in loras}
        self._base = {name: module.weight.detach().to("cpu", copy=True) for name, module in kohya_targets(pipe).items()}
        self.active: Path | None = None
        self.active_scale = scale

    def add(self, info: LoraInfo) -> None:
        """Make a checked LoRA (check_loras) switchable. A new dict, not an update in place: a thread reading
        `loras` sees the old or the new one, never one being changed."""
        self.loras = self.loras | {info.path: info}

    def remove(self, path: Path) -> None:
        """Forget a LoRA. If it is the fused one, its fuse stays until the next switch, which restores the base
        weights first: removing costs nothing, and the next fuse is the same as from a fresh start."""
        self.loras = {known: info for known, info in self.loras.items() if known != path}

    @property
    def base_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._base.values())

    def fuse(self, path: Path, scale: float | None = None) -> LoraInfo:
        """Fuse `path` at `scale` (default: the switcher's) onto the pristine base weights (the first fuse, at load,
        skips the restore)."""
        info = self.loras[path]
        scale = self.scale if scale is None else scale
        if self.active is not None:
            self.restore()
        self.active = None  # if fusing fails, the weights are the base ones, not a known LoRA
        fuse_lora(self.pipe, info, scale)
        self.active, self.active_scale = path, scale
        return info

    @torch.no_grad()
    def restore(self) -> None:
        targets = kohya_targets(self.pipe)
        if set(targets) != set(self._base):
            raise LoraError("the model's LoRA-targeted layers changed since start-up; cannot restore base weights")
        for name, module in targets.items():
            module.weight.copy_(self._base[name])

    def switch(self, path: Path, scale: float | None = None) -> float:
        """Make `path` the fused LoRA, at `scale`; returns the seconds it took (0 when it already is)."""
        scale = self.scale if scale is None else scale
        if (self.active, self.active_scale) == (path, scale):
            return 0.0
        started = time.perf_counter()
        self.fuse(path, scale)
        if self.pipe.device.type == "cuda":
            torch.cuda.synchronize(self.pipe.device)
        seconds = time.perf_counter() - started
        log.info("switched LoRA to %s at scale %g in %.2fs", path.name, scale, seconds)
        return seconds
