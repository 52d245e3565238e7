"""Write an SD1.5 pipeline as one original-layout (LDM) checkpoint file, like v1-5-pruned-emaonly.safetensors.

Used to make single-file checkpoints of the smoke and benchmark models, so that the project's
`from_single_file` path is tested on the key layout real SD1.5 files have. The key mapping follows
diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py for the SD1.x layout.
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

UNET_RESNET_PARTS = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]
UNET_TOP_LEVEL = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
VAE_ATTENTION_PARTS = [
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
]


def _unet_block_prefixes() -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) for SD1.x's 4 down blocks of 2 layers and 4 up blocks of 3."""
    pairs = []
    for i in range(4):
        for j in range(2):
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{3 * i + j + 1}.0."))
            if i < 3:
                pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{3 * i + j + 1}.1."))
        for j in range(3):
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{3 * i + j}.0."))
            if i > 0:
                pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{3 * i + j}.1."))
        if i < 3:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{3 * (i + 1)}.0.op."))
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}."))
    pairs.append(("mid_block.attentions.0.", "middle_block.1."))
    pairs += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.") for j in range(2)]
    return pairs


def _vae_prefixes() -> list[tuple[str, str]]:
    pairs = [
        ("conv_shortcut", "nin_shortcut"),
        ("conv_norm_out", "norm_out"),
        ("mid_block.attentions.0.", "mid.attn_1."),
    ]
    for i in range(4):
        pairs += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(2)]
        if i < 3:
            pairs.append((f"down_blocks.{i}.downsamplers.0.", f"down.{i}.downsample."))
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"up.{3 - i}.upsample."))
        pairs += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{3 - i}.block.{j}.") for j in range(3)]
    pairs += [(f"mid_block.resnets.{i}.", f"mid.block_{i + 1}.") for i in range(2)]
    return pairs


def _rename(key: str, pairs: list[tuple[str, str]]) -> str:
    for diffusers_part, ldm_part in pairs:
        key = key.replace(diffusers_part, ldm_part)
    return key


def unet_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    converted = {}
    for key, tensor in state.items():
        new = next((ldm + key[len(d) :] for d, ldm in UNET_TOP_LEVEL.items() if key.startswith(d)), key)
        if "resnets" in new:
            new = _rename(new, [(d, ldm) for ldm, d in UNET_RESNET_PARTS])
        converted["model.diffusion_model." + _rename(new, _unet_block_prefixes())] = tensor
    return converted


def vae_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    converted = {}
    for key, tensor in state.items():
        new = _rename(key, _vae_prefixes())
        if "mid.attn_1." in new:
            new = _rename(new, VAE_ATTENTION_PARTS)
            if new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
                tensor = tensor.reshape(*tensor.shape, 1, 1)  # LDM uses 1x1 convs here
        converted["first_stage_model." + new] = tensor
    return converted


def text_encoder_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original checkpoints keep CLIP's Hugging Face names under cond_stage_model.transformer.text_model.
    (transformers 5 drops the text_model. level from CLIPTextModel's own state dict)."""
    return {
        "cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v
        for k, v in state.items()
    }


def save_ldm_checkpoint(pipe, path: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Save unet + vae + text encoder as one safetensors file in the original SD1.x layout."""
    state = {
        **unet_to_ldm(pipe.unet.state_dict()),
        **vae_to_ldm(pipe.vae.state_dict()),
        **text_encoder_to_ldm(pipe.text_encoder.state_dict()),
    }
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(path))
    return path
