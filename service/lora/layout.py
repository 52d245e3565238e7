"""The full list of layers a kohya SD1.x LoRA wraps, with their shapes, derived from the shipped configs
(service/sd15_config) without torch: 192 UNet + 72 text-encoder modules for SD1.5. It gives the size a
LoRA of a given rank should have, and which modules a file covers.

kohya's networks.lora wraps every Linear / 1x1 Conv inside each Transformer2DModel of the UNet (proj_in,
proj_out, self- and cross-attention q/k/v/out, the GEGLU feed-forward) and inside CLIP's attention and MLP.
"""

import json
from functools import cache
from pathlib import Path

from service.config import SD15_CONFIG_DIR

SD15_DIM = 32  # the rank that worked (see the training analysis)


def unet_modules(config: dict) -> dict[str, tuple[int, int]]:
    """kohya name -> (in_features, out_features) for every wrapped UNet layer."""
    channels = list(config["block_out_channels"])
    context = config["cross_attention_dim"]
    layers = config["layers_per_block"]
    parents = []  # (diffusers path of a Transformer2DModel, channels)
    for block, kind in enumerate(config["down_block_types"]):
        if kind.startswith("CrossAttn"):
            parents += [(f"down_blocks_{block}_attentions_{i}", channels[block]) for i in range(layers)]
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn":
        parents.append(("mid_block_attentions_0", channels[-1]))
    for block, kind in enumerate(config["up_block_types"]):
        if kind.startswith("CrossAttn"):
            parents += [(f"up_blocks_{block}_attentions_{i}", channels[::-1][block]) for i in range(layers + 1)]
    modules: dict[str, tuple[int, int]] = {}
    for parent, width in parents:
        transformer = f"{parent}_transformer_blocks_0"
        shapes = {
            f"{parent}_proj_in": (width, width),
            f"{parent}_proj_out": (width, width),
            **{f"{transformer}_attn1_{layer}": (width, width) for layer in ("to_q", "to_k", "to_v", "to_out_0")},
            f"{transformer}_attn2_to_q": (width, width),
            f"{transformer}_attn2_to_k": (context, width),
            f"{transformer}_attn2_to_v": (context, width),
            f"{transformer}_attn2_to_out_0": (width, width),
            f"{transformer}_ff_net_0_proj": (width, 8 * width),  # GEGLU: two halves of 4x width
            f"{transformer}_ff_net_2": (4 * width, width),
        }
        modules |= {f"lora_unet_{name}": shape for name, shape in shapes.items()}
    return modules


def text_encoder_modules(config: dict, prefix: str = "lora_te") -> dict[str, tuple[int, int]]:
    width, hidden = config["hidden_size"], config["intermediate_size"]
    modules: dict[str, tuple[int, int]] = {}
    for layer in range(config["num_hidden_layers"]):
        base = f"{prefix}_text_model_encoder_layers_{layer}"
        modules |= {f"{base}_self_attn_{p}_proj": (width, width) for p in ("q", "k", "v", "out")}
        modules |= {f"{base}_mlp_fc1": (width, hidden), f"{base}_mlp_fc2": (hidden, width)}
    return modules


@cache
def sd15_modules() -> dict[str, tuple[int, int]]:
    """The 264 modules (192 UNet + 72 text encoder) of a full kohya SD1.5 LoRA."""
    return unet_modules(_config(SD15_CONFIG_DIR / "unet")) | text_encoder_modules(
        _config(SD15_CONFIG_DIR / "text_encoder")
    )


def sd15_lora_bytes(rank: int = SD15_DIM, bytes_per_value: int = 2) -> int:
    """Tensor bytes of a full kohya SD1.5 LoRA: rank x (in + out) per module, plus one alpha each (no header)."""
    modules = sd15_modules()
    return bytes_per_value * (rank * sum(i + o for i, o in modules.values()) + len(modules))


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())
