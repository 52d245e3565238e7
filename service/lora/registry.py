"""The LoRAs one engine serves, behind one object: the default LoRA (fused at load), the selectable ones by name
(the allow-list: requests name a LoRA, never a path), the private ones added at run time (Cog's lora_url: only
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
            f"{mode}: switching LoRAs (loras_dir, or lora_url with PUNKS_LORA_URL_CACHE_SIZE > 0) is not "
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
    ):
        """`files`: the allow-list, name -> file; `switcher`: needed to serve any LoRA but the default one."""
        self.default = default
        self.expected_rank = expected_rank
        self.files = dict(files or {})
        self.private: dict[str, Path] = {}  # add's (a caller's lora_url): never listed nor selectable by name
        self.switcher = switcher

    @classmethod
    def load(
        cls, pipe: StableDiffusionPipeline, settings: Settings, default: Path, files: dict[str, Path] | None = None
    ) -> "LoraRegistry":
        """Inspect and fuse `default` into `pipe`; `files`: the selectable LoRAs (name -> file), by default every
        *.safetensors in settings.loras_path(). With selectable LoRAs, or lora_url's cache (LoRAs added at run
        time, `add`), every file is checked against the model now and the base weights are kept for switching."""
        files = find_loras(settings.loras_path()) if files is None else files
        info = inspect_sd15_lora(default, settings.expected_lora_rank)
        if not files and not settings.lora_url_cache_size:
            fuse_lora(pipe, info, settings.lora_scale)
            return cls(info, settings.expected_lora_rank)
        check_switching_allowed(settings)
        selectable = check_loras(pipe, files, settings.expected_lora_rank)  # a wrong file fails now
        switcher = LoraSwitcher(pipe, settings.lora_scale, [info, *selectable.values()])
        log.info(
            "selectable LoRAs: %s (base copy of %.0f MB kept for switching)",
            ", ".join(sorted(files)) or "none yet (lora_url)",
            switcher.base_bytes / 1e6,
        )
        switcher.fuse(info.path)
        return cls(info, settings.expected_lora_rank, files, switcher)

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

    def use(self, name: str | None) -> float:
        """Fuse the LoRA named `name`, private ones included (a no-op when it already is); returns the seconds it
        took."""
        path = self.file(name, private=True)
        if path == self.active:
            return 0.0
        assert self.switcher is not None  # without one, only the fused LoRA resolves (load, add)
        return self.switcher.switch(path)

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
