"""Read a kohya LoRA file without loading any model, and judge whether it fits SD1.5.

Only the safetensors header is read (names, shapes, dtypes, metadata), so inspection is instant
even for a 1.7 GB SDXL file and needs no torch.
"""

import json
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# Width of the text features the UNet cross-attends to, per base model family.
CROSS_ATTENTION_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
FAMILY_NAMES = {"sd1": "SD1.5", "sd2": "SD2.x", "sdxl": "SDXL", "unknown": "unknown"}
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


class LoraError(ValueError):
    """The file is not a LoRA this service can use; the message says why and what was expected."""


@dataclass(frozen=True)
class LoraModule:
    name: str  # kohya name, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    rank: int
    alpha: float | None
    down_shape: tuple[int, ...]
    up_shape: tuple[int, ...]

    @property
    def is_conv(self) -> bool:
        return len(self.down_shape) == 4 and self.down_shape[2:] != (1, 1)

    @property
    def in_features(self) -> int:
        return self.down_shape[1]

    @property
    def out_features(self) -> int:
        return self.up_shape[0]


@dataclass(frozen=True)
class LoraInfo:
    path: Path
    file_size: int
    modules: dict[str, LoraModule]
    dtypes: frozenset[str]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values()})

    @property
    def alphas(self) -> list[float]:
        return sorted({m.alpha for m in self.modules.values() if m.alpha is not None})

    @property
    def rank(self) -> int:
        """The most common rank (kohya's network_dim)."""
        return Counter(m.rank for m in self.modules.values()).most_common(1)[0][0]

    @property
    def module_counts(self) -> dict[str, int]:
        """Modules per target: unet, te (SD1/SD2 text encoder), te1/te2 (SDXL's two text encoders)."""
        return dict(Counter(name.split("_")[1] for name in self.modules))

    @property
    def family_from_keys(self) -> str:
        """Base model family read from module names and the cross-attention width."""
        counts = self.module_counts
        if "te1" in counts or "te2" in counts or any("_input_blocks_" in n for n in self.modules):
            return "sdxl"
        widths = {m.in_features for n, m in self.modules.items() if n.endswith(("attn2_to_k", "attn2_to_v"))}
        families = {CROSS_ATTENTION_WIDTH.get(w, "unknown") for w in widths}
        return families.pop() if len(families) == 1 else "unknown"

    @property
    def family_from_metadata(self) -> str:
        version = self.metadata.get("ss_base_model_version", "").lower()
        if not version:
            return "unknown"
        if "xl" in version:
            return "sdxl"
        if "v2" in version or self.metadata.get("ss_v2") == "True":
            return "sd2"
        return "sd1" if "v1" in version else "unknown"

    @property
    def family(self) -> str:
        """Shapes win over metadata; metadata fills in when shapes can't tell (e.g. the smoke model)."""
        from_keys = self.family_from_keys
        return from_keys if from_keys != "unknown" else self.family_from_metadata

    def describe(self) -> str:
        ranks = "/".join(str(r) for r in self.ranks)
        alphas = "/".join(f"{a:g}" for a in self.alphas) or "unknown"
        return f"{FAMILY_NAMES[self.family]} LoRA, rank {ranks}, alpha {alphas}, {len(self.modules)} modules"


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file ({tensor name: {dtype, shape, data_offsets}, '__metadata__': {...}})
    and the byte offset where tensor data starts."""
    try:
        with path.open("rb") as handle:
            size_bytes = handle.read(8)
            if len(size_bytes) != 8:
                raise LoraError(f"{path}: not a safetensors file (too short)")
            (header_size,) = struct.unpack("<Q", size_bytes)
            if header_size > 100_000_000 or header_size > path.stat().st_size - 8:
                raise LoraError(f"{path}: not a safetensors file (bad header length)")
            return json.loads(handle.read(header_size)), 8 + header_size
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LoraError(f"{path}: not a safetensors file (unreadable header: {error})") from None


def inspect_lora(path: Path) -> LoraInfo:
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file not found: {path}")
    header, data_start = read_safetensors_header(path)
    metadata = header.pop("__metadata__", None) or {}
    data_end = data_start + max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if data_end > path.stat().st_size:
        raise LoraError(f"{path}: truncated file ({path.stat().st_size} bytes, header promises more)")
    modules = {}
    for key in header:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key.removesuffix(".lora_down.weight")
        up = header.get(f"{name}.lora_up.weight")
        if up is None:
            raise LoraError(f"{path}: {name} has lora_down but no lora_up weight")
        down_shape = tuple(header[key]["shape"])
        alpha_entry = header.get(f"{name}.alpha")
        modules[name] = LoraModule(
            name=name,
            rank=down_shape[0],
            alpha=_read_scalar(path, header, f"{name}.alpha") if alpha_entry else None,
            down_shape=down_shape,
            up_shape=tuple(up["shape"]),
        )
    if not modules:
        kinds = "no tensors" if not header else "no kohya lora_down/lora_up pairs"
        raise LoraError(f"{path}: not a kohya LoRA ({kinds}); expected keys like lora_unet_*.lora_down.weight")
    dtypes = frozenset(entry["dtype"] for entry in header.values())
    return LoraInfo(path=path, file_size=path.stat().st_size, modules=modules, dtypes=dtypes, metadata=metadata)


def _read_scalar(path: Path, header: dict, key: str) -> float:
    """kohya stores alpha as a 0-d tensor; read its few bytes straight from the file."""
    from safetensors import safe_open

    entry = header[key]
    if entry["dtype"] == "BF16":
        with safe_open(path, framework="pt") as handle:  # numpy has no bfloat16
            return float(handle.get_tensor(key))
    with safe_open(path, framework="numpy") as handle:
        return float(handle.get_tensor(key))


def check_sd15_lora(info: LoraInfo, expected_rank: int) -> list[str]:
    """Refuse a LoRA for another base model; return warnings for what is allowed but unusual."""
    family = info.family
    if family != "sd1":
        raise LoraError(
            f"{info.path} is a {info.describe()}; this service needs an SD1.5 kohya LoRA "
            f"(keys lora_unet_*/lora_te_*, cross-attention width 768, rank {expected_rank})"
        )
    meta_family = info.family_from_metadata
    warnings = []
    if meta_family not in ("unknown", family):
        warnings.append(f"{info.path}: metadata says {FAMILY_NAMES[meta_family]} but the shapes are SD1.5")
    if info.ranks != [expected_rank]:
        warnings.append(
            f"{info.path}: rank {'/'.join(map(str, info.ranks))}, expected {expected_rank} "
            "(dim 64 gave photographs in training; see the training analysis)"
        )
    return warnings
