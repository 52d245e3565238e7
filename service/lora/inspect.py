"""Read a kohya LoRA file without loading any model, and judge whether it fits SD1.5.

Only the safetensors header (names, shapes, dtypes, metadata; service/weights/files.py) and the few bytes of
each module's alpha are read, so inspection is instant even for a 1.7 GB SDXL file and needs no torch. Start-up,
`weights check` and `lora inspect` all judge a file here, so they agree on what is wrong with it.
"""

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from service.weights.files import TensorTable, WeightFileError, read_scalars, read_tensor_table

log = logging.getLogger(__name__)

# Width of the text features the UNet cross-attends to, per base model family.
CROSS_ATTENTION_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
TEXT_WIDTH = {768: "sd1", 1024: "sd2"}
FAMILY_NAMES = {"sd1": "SD1.5", "sd2": "SD2.x", "sdxl": "SDXL", "unknown": "unknown"}
# (down, up, format) key suffixes of the LoRA layouts we can read: kohya, PEFT, diffusers (new and old attn processors).
PAIR_SUFFIXES = (
    (".lora_down.weight", ".lora_up.weight", "kohya"),
    (".lora_A.weight", ".lora_B.weight", "peft"),
    (".lora_A.default.weight", ".lora_B.default.weight", "peft"),
    (".lora.down.weight", ".lora.up.weight", "diffusers"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight", "diffusers"),
    ("_lora.down.weight", "_lora.up.weight", "diffusers"),
)
# Which model a module belongs to, by name prefix: kohya and diffusers/PEFT spellings.
TARGET_PREFIXES = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "te1"),
    ("lora_te2_", "te2"),
    ("lora_te_", "te"),
    ("unet.", "unet"),
    ("text_encoder_2.", "te2"),
    ("text_encoder.", "te"),
    ("te1.", "te1"),
    ("te2.", "te2"),
)
LYCORIS_MARKERS = ("hada_w1_a", "lokr_w1", "oft_blocks", "oft_diag")


class LoraError(ValueError):
    """The file is not a LoRA this service can use; the message says why and what was expected."""


@dataclass(frozen=True)
class LoraModule:
    name: str  # kohya name, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    rank: int
    alpha: float | None
    down_shape: tuple[int, ...]
    up_shape: tuple[int, ...]
    target: str = ""  # unet, te, te1, te2 or unknown; "" = read it from the kohya name
    dtype: str = ""  # safetensors dtype of the down weight

    @property
    def scale(self) -> float | None:
        """alpha / rank, what the delta is multiplied by; None when the file stores no alpha."""
        return None if self.alpha is None else self.alpha / self.rank

    @property
    def kind(self) -> str:
        return _target(self.name) if not self.target else self.target

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
    format: str = "kohya"  # kohya, peft or diffusers (key layout)
    tensor_bytes: int = 0  # bytes of tensor data (the file minus its header)

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
        counts = Counter(module.kind for module in self.modules.values())
        if "te2" in counts and "te" in counts:  # diffusers SDXL: text_encoder is SDXL's first encoder
            counts["te1"] += counts.pop("te")
        return dict(counts)

    @property
    def conv_modules(self) -> list[str]:
        """LoCon layers: a 3x3 (or larger) kernel in lora_down."""
        return sorted(name for name, module in self.modules.items() if module.is_conv)

    @property
    def family_from_keys(self) -> str:
        """Base model family read from module names and the cross-attention width."""
        counts = self.module_counts
        normalized = {_normalized(n): m for n, m in self.modules.items()}
        if "te1" in counts or "te2" in counts or any("input_blocks_" in n for n in normalized):
            return "sdxl"
        widths = {m.in_features for n, m in normalized.items() if n.endswith(("attn2_to_k", "attn2_to_v"))}
        families = {CROSS_ATTENTION_WIDTH.get(w, "unknown") for w in widths}
        if not widths:  # text-encoder-only LoRA: CLIP ViT-L (768) is SD1, OpenCLIP ViT-H (1024) is SD2
            widths = {m.in_features for n, m in normalized.items() if n.endswith("self_attn_q_proj")}
            families = {TEXT_WIDTH.get(w, "unknown") for w in widths}
        return families.pop() if len(families) == 1 else "unknown"

    @property
    def family_from_metadata(self) -> str:
        version = self.metadata.get("ss_base_model_version", "").lower()
        if not version:  # sd-scripts also writes the SAI model spec, e.g. stable-diffusion-v1/lora
            version = self.metadata.get("modelspec.architecture", "").lower().replace("stable-diffusion-", "sd_")
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


def inspect_lora(path: Path) -> LoraInfo:
    """What the file holds; LoraError when it is no complete safetensors file or no LoRA at all."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file not found: {path}")
    try:
        table = read_tensor_table(path)
    except WeightFileError as error:
        raise LoraError(f"{path}: {error}") from None
    tensors = table.tensors
    if any(marker in key for key in tensors for marker in LYCORIS_MARKERS):
        raise LoraError(
            f"{path}: a LyCORIS LoHa/LoKr/OFT network; only LoRA/LoCon (lora_down/lora_up) files are supported"
        )
    pairs, formats = {}, set()  # module name -> (down, up) weights
    for key, down in tensors.items():
        pair = next((p for p in PAIR_SUFFIXES if key.endswith(p[0])), None)
        if pair is None:
            continue
        down_suffix, up_suffix, layout = pair
        name = key.removesuffix(down_suffix)
        up = tensors.get(name + up_suffix)
        if up is None:
            raise LoraError(f"{path}: {name} has a {down_suffix} but no {up_suffix} weight")
        if len(down.shape) < 2:
            raise LoraError(f"{path}: {key} has shape {list(down.shape)}, expected (rank, in_features, ...)")
        pairs[name] = (down, up)
        formats.add(layout)
    if not pairs:
        kinds = "no tensors" if not tensors else "no lora_down/lora_up (or lora_A/lora_B) pairs"
        raise LoraError(f"{path}: not a LoRA ({kinds}); expected keys like lora_unet_*.lora_down.weight")
    alphas = _alphas(path, table, list(pairs))
    modules = {
        name: LoraModule(
            name=name,
            rank=down.shape[0],
            alpha=alphas.get(name),
            down_shape=down.shape,
            up_shape=up.shape,
            target=_target(name),
            dtype=down.dtype,
        )
        for name, (down, up) in pairs.items()
    }
    return LoraInfo(
        path=path,
        file_size=path.stat().st_size,
        modules=modules,
        dtypes=table.dtypes,
        metadata=table.metadata,
        format="+".join(sorted(formats)),
        tensor_bytes=table.data_bytes,
    )


def inspect_sd15_lora(path: Path, expected_rank: int) -> LoraInfo:
    """inspect_lora, refusing a LoRA for another base model and logging what is only unusual (another rank):
    the check start-up runs on every LoRA it will fuse."""
    info = inspect_lora(path)
    for warning in check_sd15_lora(info, expected_rank):
        log.warning(warning)
    return info


def _alphas(path: Path, table: TensorTable, names: list[str]) -> dict[str, float]:
    """Module name -> alpha, for the modules that store one: kohya writes a 0-d tensor `<name>.alpha` (diffusers:
    without the `_lora` suffix). Only those few bytes are read."""
    keys = {}
    for name in names:
        key = next((k for k in (f"{name}.alpha", f"{name.removesuffix('_lora')}.alpha") if k in table.tensors), None)
        if key is not None:
            keys[name] = key
    try:
        values = read_scalars(path, table, keys.values())
    except WeightFileError as error:
        raise LoraError(f"{path}: {error}") from None
    return {name: values[key] for name, key in keys.items()}


def _target(name: str) -> str:
    for prefix, target in TARGET_PREFIXES:
        if name.startswith(prefix):
            return target
    return "unet" if any(part in name for part in ("down_blocks", "up_blocks", "mid_block")) else "unknown"


def _normalized(name: str) -> str:
    """kohya-style spelling of any layout's module name: attn2.processor.to_k_lora -> attn2_to_k."""
    return name.replace(".", "_").replace("_processor_", "_").removesuffix("_lora")


def check_sd15_lora(info: LoraInfo, expected_rank: int) -> list[str]:
    """Refuse a LoRA for another base model; return warnings for what is allowed but unusual."""
    family = info.family
    if info.format != "kohya":
        raise LoraError(
            f"{info.path} is a {info.format}-format LoRA ({info.describe()}); this service loads kohya files "
            "(keys lora_unet_*/lora_te_*.lora_down.weight)"
        )
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
