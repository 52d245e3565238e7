"""The LoRAs one engine serves, behind one object: the default LoRA (fused at load), the selectable ones by name
(the allow-list: requests name a LoRA, never a path), the private ones added at run time (Cog's lora_weights: only
the request that asked for one renders with it) and, when more than one can be served, the switcher that fuses
the one a batch needs.

Start-up is `LoraRegistry.load`: inspect the default file (service/lora/inspect.py), then either fuse it once
(service/lora/fuse.py) or, with selectable LoRAs, check every file against the model and keep the base weights
for switching (service/lora/switch.py). Switching rewrites fp16 weights in place, so it is refused with a compiled
or fp8 UNet; that rule lives here too.
"""

import logging
from pathlib import Path

from diffusers import StableDiffusionPipeline

from service.config import Settings
from service.errors import RequestError
from service.lora.fuse import fuse_lora
from service.lora.inspect import LoraInfo, check_sd15_lora, inspect_sd15_lora
from service.lora.switch import LoraSwitcher, check_loras, find_loras

log = logging.getLogger(__name__)


def check_switching_allowed(settings: Settings) -> None:
    """Switching LoRAs rewrites the fp16 weights in place: not with a compiled or fp8 UNet (ValueError)."""
    if settings.compile or settings.fp8:
        mode = "compile" if settings.compile else "fp8"
        raise ValueError(
            f"{mode}: switching LoRAs (loras_dir, or lora_weights with PUNKS_LORA_URL_CACHE_SIZE > 0) is not "
            f"supported with PUNKS_{mode.upper()} (the switcher rewrites fp16 weights in place); set "
            f"PUNKS_LORA_URL_CACHE_SIZE=0 and leave {settings.loras_path()} empty"
        )


class LoraRegistry:
    """What the engine asks about LoRAs: which names are served, which file a request's name means, which one is
    fused now, and fusing another (`use`). Without a switcher only the default LoRA is ever fused."""

    def __init__(
        self,
        default: LoraInfo,
        expected_rank: int,
        files: dict[str, Path] | None = None,
        switcher: LoraSwitcher | None = None,
        scale: float = 1.0,
    ):
        """`files`: the allow-list, name -> file; `switcher`: needed to serve any LoRA but the default one, or the
        default one at another scale than `scale`, the one it was fused at."""
        self.default = default
        self.scale = scale
        self.expected_rank = expected_rank
        self.files = dict(files or {})
        self.private: dict[str, Path] = {}  # add's (a caller's lora_weights): never listed nor selectable by name
        self.switcher = switcher

    @classmethod
    def load(
        cls, pipe: StableDiffusionPipeline, settings: Settings, default: Path, files: dict[str, Path] | None = None
    ) -> "LoraRegistry":
        """Inspect and fuse `default` into `pipe`; `files`: the selectable LoRAs (name -> file), by default every
        *.safetensors in settings.loras_path(). With selectable LoRAs, or lora_weights's cache (LoRAs added at run
        time, `add`), every file is checked against the model now and the base weights are kept for switching."""
        files = find_loras(settings.loras_path()) if files is None else files
        info = inspect_sd15_lora(default, settings.expected_lora_rank)
        if not files and not settings.lora_url_cache_size:
            fuse_lora(pipe, info, settings.lora_scale)
            return cls(info, settings.expected_lora_rank, scale=settings.lora_scale)
        check_switching_allowed(settings)
        selectable = check_loras(pipe, files, settings.expected_lora_rank)  # a wrong file fails now
        switcher = LoraSwitcher(pipe, settings.lora_scale, [info, *selectable.values()])
        log.info(
            "selectable LoRAs: %s (base copy of %.0f MB kept for switching)",
            ", ".join(sorted(files)) or "none yet (lora_weights)",
            switcher.base_bytes / 1e6,
        )
        switcher.fuse(info.path)
        return cls(info, settings.expected_lora_rank, files, switcher, settings.lora_scale)

    @property
    def names(self) -> list[str]:
        """The LoRAs a request may name besides the default one (`default_name`, or no name)."""
        return sorted(self.files)

    @property
    def default_name(self) -> str:
        """The name of the LoRA served when a request names none (its file stem)."""
        return self.default.path.stem

    @property
    def active(self) -> Path | None:
        """The fused LoRA's file; None while a switch that failed left the base weights (LoraSwitcher.fuse)."""
        return self.switcher.active if self.switcher is not None else self.default.path

    def file(self, name: str | None, private: bool = False) -> Path:
        """The file behind a request's LoRA name: the default LoRA (no name, or its name), a served one, or with
        `private` one of add's. RequestError listing the names a request may use otherwise."""
        if name is None or name == self.default_name:
            return self.default.path
        if name in self.files:
            return self.files[name]
        if private and name in self.private:
            return self.private[name]
        allowed = ", ".join([self.default_name, *self.names])
        raise RequestError("lora", f"unknown LoRA {name[:80]!r}; allowed: {allowed}")

    @property
    def active_scale(self) -> float:
        """The scale the fused LoRA was fused at."""
        return self.switcher.active_scale if self.switcher is not None else self.scale

    def check_scale(self, scale: float) -> None:
        """RequestError naming lora_scale when this registry cannot fuse at `scale`: without a switcher (a compiled
        or fp8 engine, or one with nothing to switch to) the LoRA stays fused at its start-up scale."""
        if self.switcher is None and scale != self.scale:
            raise RequestError(
                "lora_scale",
                f"this deployment fuses its LoRA once, at {self.scale:g} (PUNKS_LORA_SCALE); other scales need "
                "PUNKS_LORA_URL_CACHE_SIZE > 0, which PUNKS_COMPILE and PUNKS_FP8 rule out",
            )

    def is_active(self, name: str | None, scale: float) -> bool:
        """Whether the LoRA named `name` is fused now, at `scale`."""
        return (self.file(name, private=True), scale) == (self.active, self.active_scale)

    def use(self, name: str | None, scale: float | None = None) -> float:
        """Fuse the LoRA named `name`, private ones included, at `scale` (default: the start-up one); a no-op when it
        already is. Returns the seconds it took."""
        scale = self.scale if scale is None else scale
        if self.is_active(name, scale):
            return 0.0
        assert self.switcher is not None  # without one, only the fused LoRA at its scale resolves (load, add, check)
        return self.switcher.switch(self.file(name, private=True), scale)

    def warnings(self, info: LoraInfo) -> list[str]:
        """What the guard warns about in a LoRA that it lets through (a rank other than the one that worked)."""
        return check_sd15_lora(info, self.expected_rank)

    def add(self, name: str, path: Path) -> LoraInfo:
        """Make the LoRA file at `path` renderable as the private name `name`, after the guard start-up runs on
        every LoRA (family, rank, keys, shapes, finite values): LoraError with the guard's message when it does not
        fit. `private` is replaced, not changed in place, so a thread reading it sees the old or the new one."""
        if self.switcher is None:
            raise RuntimeError("adding LoRAs needs the switcher: start with PUNKS_LORA_URL_CACHE_SIZE > 0")
        if name in self.files or name in self.private:
            raise ValueError(f"a LoRA named {name!r} is already served")
        info = check_loras(self.switcher.pipe, {name: path}, self.expected_rank)[name]
        self.switcher.add(info)
        self.private = self.private | {name: path}
        return info

    def remove(self, name: str) -> Path | None:
        """Stop serving a LoRA added with `add`; returns its file when no other private name serves it (the switcher
        has forgotten it then, and the file may be deleted), else None."""
        path = self.private[name]
        self.private = {known: file for known, file in self.private.items() if known != name}
        if path in self.private.values() or self.switcher is None:
            return None
        self.switcher.remove(path)
        return path
