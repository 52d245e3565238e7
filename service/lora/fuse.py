"""Fuse a kohya LoRA into the loaded SD1.5 weights, checking every module on the way.

diffusers only warns about LoRA keys that match no layer; here a file that does not fit the model is refused,
every module must be injected, and no adapter wrapper may stay behind (unfused wrappers slow each UNet step).
The file itself was judged before (service/lora/inspect.py: inspect_sd15_lora), once per file at start-up.
"""

import torch
from diffusers import StableDiffusionPipeline
from peft.tuners.lora import LoraLayer
from safetensors import safe_open

from service.lora.inspect import LoraError, LoraInfo

ADAPTER_NAME = "bespoke_punks"
# Modules kohya's networks.lora wraps in SD1.x: every Linear / 1x1 Conv inside these blocks.
UNET_LORA_PARENTS = ("Transformer2DModel",)
TEXT_LORA_PARENTS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


def kohya_targets(pipe: StableDiffusionPipeline) -> dict[str, torch.nn.Linear | torch.nn.Conv2d]:
    """kohya name -> module for every layer a kohya SD1.x LoRA wraps."""
    targets: dict[str, torch.nn.Linear | torch.nn.Conv2d] = {}
    models = (("lora_unet", pipe.unet, UNET_LORA_PARENTS), ("lora_te", pipe.text_encoder, TEXT_LORA_PARENTS))
    for prefix, model, parents in models:
        for parent_name, parent in model.named_modules():
            if type(parent).__name__ not in parents:
                continue
            for child_name, child in parent.named_modules():
                is_linear = isinstance(child, torch.nn.Linear)
                is_pointwise_conv = isinstance(child, torch.nn.Conv2d) and child.kernel_size == (1, 1)
                if child_name and (is_linear or is_pointwise_conv):
                    targets[f"{prefix}_{_kohya_path(prefix, parent_name, child_name)}"] = child
    return targets


def check_lora_matches_model(pipe: StableDiffusionPipeline, info: LoraInfo) -> None:
    """Every module in the file must exist in the model with the same shape (diffusers only warns), and every
    value must be finite: a NaN alpha or weight would render black images and report them as succeeded."""
    check_lora_values(info)
    targets = kohya_targets(pipe)
    unknown = sorted(set(info.modules) - set(targets))
    if unknown:
        raise LoraError(
            f"{info.path}: {len(unknown)} of {len(info.modules)} LoRA modules match no layer of the SD1.5 model "
            f"(first: {unknown[0]}); it was trained for another model ({info.describe()})"
        )
    for name, module in info.modules.items():
        out_features, in_features = targets[name].weight.shape[:2]
        if (module.in_features, module.out_features) != (in_features, out_features):
            raise LoraError(
                f"{info.path}: {name} is {module.in_features}->{module.out_features} but the model's layer is "
                f"{in_features}->{out_features}; this LoRA was trained for another base model ({info.describe()})"
            )


def check_lora_values(info: LoraInfo) -> None:
    """LoraError naming the file and the first tensor that holds NaN or an infinity (one tensor in memory at once)."""
    with safe_open(info.path, framework="pt") as tensors:
        names = tensors.keys()
        for key in names:
            if not torch.isfinite(tensors.get_tensor(key).float()).all():
                raise LoraError(
                    f"{info.path}: tensor {key} holds NaN or infinite values (a diverged training run or a corrupt "
                    "file); refused"
                )


def count_lora_layers(pipe: StableDiffusionPipeline) -> int:
    return sum(isinstance(m, LoraLayer) for model in (pipe.unet, pipe.text_encoder) for m in model.modules())


def fuse_lora(pipe: StableDiffusionPipeline, lora: LoraInfo, scale: float) -> None:
    """Check the LoRA fits the model, load it, verify every module was injected, fuse at `scale`, and drop the
    adapter wrappers.

    Unfused LoRA wrappers make each UNet step much slower, so nothing of them may stay behind.
    """
    check_lora_matches_model(pipe, lora)
    pipe.load_lora_weights(str(lora.path), adapter_name=ADAPTER_NAME)
    injected = count_lora_layers(pipe)
    if injected != len(lora.modules):
        raise LoraError(
            f"{lora.path}: only {injected} of {len(lora.modules)} LoRA modules were injected into the model"
        )
    pipe.fuse_lora(lora_scale=scale, adapter_names=[ADAPTER_NAME])
    pipe.unload_lora_weights()
    if count_lora_layers(pipe):
        raise RuntimeError("LoRA adapter wrappers are still present after fusing")


def _kohya_path(prefix: str, parent_name: str, child_name: str) -> str:
    """kohya names CLIP layers from CLIPTextModel's old text_model.* paths, which transformers 5 dropped."""
    path = f"{parent_name}.{child_name}"
    if prefix == "lora_te" and not path.startswith("text_model."):
        path = "text_model." + path
    return path.replace(".", "_")
