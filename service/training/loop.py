"""The training loop: peft LoRA adapters on exactly the layers a kohya SD1.x LoRA wraps (service/lora/fuse.py's
kohya_targets), trained on the UNet's noise prediction, saved after every epoch as a kohya file (kohya key names,
fp16, `ss_*` metadata) that the service's LoRA guard accepts and the engine fuses.

1. load the base (frozen; bf16 on a GPU, float32 on a CPU) and put LoRA adapters (float32) on its UNet and text
   encoder;
2. encode every sprite once: upscaled nearest to the resolution (cells of 21 or 22 px at 512), through the VAE;
3. per step: noise a batch of latents at random timesteps, encode its captions in 77-token chunks as the engine
   does (service/prompts.py), predict the noise, MSE, AdamW on the adapters (bf16 autocast on a GPU);
4. per epoch: save `<name>-<epoch>.safetensors` and the optimizer state, so that a stopped run resumes after its
   last finished epoch.
"""

import contextlib
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import cast_training_params
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from service.config import SD15_CONFIG_DIR
from service.loading import load_base_pipeline
from service.lora.fuse import kohya_targets
from service.pixelart import upscale
from service.prompts import CHUNK_TOKENS, MAX_CHUNKS, chunk_input_ids
from service.training.data import Example
from service.training.recipe import Recipe

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"  # optimizer state and finished epochs, beside the checkpoints
PARTS = ("unet", "text_encoder")


@dataclass
class EpochLog:
    epoch: int
    steps: int
    loss: float  # mean over the epoch's steps
    seconds: float
    checkpoint: str


class KohyaLoraAdapters:
    """peft LoRA adapters on every layer a kohya SD1.x LoRA wraps, read and written under kohya's names."""

    def __init__(self, pipe, rank: int, alpha: float):
        kohya_names = {id(module): name for name, module in kohya_targets(pipe).items()}
        self.pipe = pipe
        self.paths: dict[str, dict[str, str]] = {}  # part -> {module path in the part: kohya name}
        for part in PARTS:
            model = getattr(pipe, part)
            paths = {path: kohya_names[id(m)] for path, m in model.named_modules() if id(m) in kohya_names}
            model.requires_grad_(False)
            # kohya's init (kaiming A, zero B) and scale (alpha / rank); peft annotates lora_alpha int, takes a float
            config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(paths), init_lora_weights=True)  # type: ignore[arg-type]
            inject_adapter_in_model(config, model)
            self.paths[part] = paths
        self.alpha = alpha

    def parameters(self, part: str) -> list[torch.nn.Parameter]:
        return [p for p in getattr(self.pipe, part).parameters() if p.requires_grad]

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for part, paths in self.paths.items():
            state = get_peft_model_state_dict(getattr(self.pipe, part))
            for path, name in paths.items():
                tensors[f"{name}.lora_down.weight"] = state[f"{path}.lora_A.weight"]
                tensors[f"{name}.lora_up.weight"] = state[f"{path}.lora_B.weight"]
                tensors[f"{name}.alpha"] = torch.tensor(self.alpha)
        return {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in tensors.items()}

    def load_kohya(self, path: Path) -> None:
        tensors = load_file(str(path))
        for part, paths in self.paths.items():
            state = {}
            for module, name in paths.items():
                state[f"{module}.lora_A.weight"] = tensors[f"{name}.lora_down.weight"].float()
                state[f"{module}.lora_B.weight"] = tensors[f"{name}.lora_up.weight"].float()
            set_peft_model_state_dict(getattr(self.pipe, part), state)


def kohya_metadata(recipe: Recipe, examples: list[Example], epoch: int, steps: int, name: str) -> dict[str, str]:
    """The training's settings as kohya's sd-scripts writes them (`lora inspect` and A1111 read these)."""
    tags = Counter(tag.strip() for e in examples for tag in e.caption.split(",") if tag.strip())
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(recipe.rank),
        "ss_network_alpha": f"{recipe.alpha:g}",
        "ss_base_model_version": "sd_v1",
        "ss_resolution": f"({recipe.resolution}, {recipe.resolution})",
        "ss_num_train_images": str(len(examples)),
        "ss_num_epochs": str(recipe.epochs),
        "ss_epoch": str(epoch),
        "ss_steps": str(steps),
        "ss_max_train_steps": str(recipe.epochs * steps_per_epoch(len(examples), recipe.batch_size)),
        "ss_batch_size_per_device": str(recipe.batch_size),
        "ss_learning_rate": str(recipe.learning_rate),
        "ss_unet_lr": str(recipe.learning_rate),
        "ss_text_encoder_lr": str(recipe.text_encoder_learning_rate),
        "ss_optimizer": "torch.optim.AdamW",
        "ss_lr_scheduler": "constant",
        "ss_seed": str(recipe.seed),
        "ss_output_name": name,
        "ss_training_comment": "punks train: sprites upscaled nearest, every epoch ranked by `lora evaluate`",
        "ss_tag_frequency": json.dumps({"data": dict(tags.most_common())}),
        **recipe.metadata(),
    }


def steps_per_epoch(examples: int, batch_size: int) -> int:
    return math.ceil(examples / batch_size)


class ProgressLog:
    """Steps, loss, epoch and time left, as log lines (the CLI's stderr and Cog's logs) at most every `every_s`."""

    def __init__(self, total_steps: int, done: int, every_s: float = 10.0):
        self.total, self.done, self.every_s = total_steps, done, every_s
        self.started, self.session_steps, self.last = time.monotonic(), 0, 0.0
        self.losses: list[float] = []

    def step(self, epoch: int, epochs: int, loss: float, force: bool = False) -> None:
        self.done += 1
        self.session_steps += 1
        self.losses.append(loss)
        now = time.monotonic()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        rate = self.session_steps / max(now - self.started, 1e-9)
        left = (self.total - self.done) / rate
        recent = float(np.mean(self.losses[-50:]))
        log.info(
            "epoch %d/%d  step %d/%d  loss %.4f  %.2f steps/s  %s left (training)",
            *(epoch, epochs, self.done, self.total, recent, rate, _duration(left)),
        )


def train_lora(
    base_model: Path,
    examples: list[Example],
    recipe: Recipe,
    checkpoints: Path,
    name: str,
    device: str,
    resume: bool = True,
    on_epoch: Callable[[EpochLog], None] | None = None,
) -> list[Path]:
    """Train and save one checkpoint per epoch into `checkpoints`; returns them all, earlier runs' included. With
    `resume`, a run whose state file is there goes on after its last finished epoch."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    on_gpu = device.startswith("cuda")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    torch.manual_seed(recipe.seed)
    pipe = load_base_pipeline(base_model, SD15_CONFIG_DIR, dtype).to(device)
    adapters = KohyaLoraAdapters(pipe, recipe.rank, recipe.alpha)
    cast_training_params([pipe.unet, pipe.text_encoder], dtype=torch.float32)
    optimizer = torch.optim.AdamW(
        [
            {"params": adapters.parameters("unet"), "lr": recipe.learning_rate},
            {"params": adapters.parameters("text_encoder"), "lr": recipe.text_encoder_learning_rate},
        ]
    )
    finished = _resume(checkpoints, adapters, optimizer, recipe) if resume else 0
    files = [checkpoints / checkpoint_name(name, epoch) for epoch in range(1, finished + 1)]
    if finished >= recipe.epochs:
        return files
    latents = encode_latents(pipe, examples, recipe, device)
    limit = MAX_CHUNKS * CHUNK_TOKENS  # the engine's prompt budget
    tokens = [caption_ids(pipe.tokenizer, e.caption) for e in examples]
    if cut := [e.name for e, ids in zip(examples, tokens, strict=True) if len(ids) > limit]:
        log.warning(
            "%d captions cut to %d CLIP tokens, as the engine cuts prompts (first: %s)", len(cut), limit, cut[0]
        )
    rows = [ids[:limit] for ids in tokens]
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    per_epoch = steps_per_epoch(len(examples), recipe.batch_size)
    progress = ProgressLog(recipe.epochs * per_epoch, finished * per_epoch)
    pipe.unet.train()
    pipe.text_encoder.train()
    for epoch in range(finished + 1, recipe.epochs + 1):
        started, losses = time.monotonic(), []
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(recipe.seed * 1000 + epoch))
        for index in order.split(recipe.batch_size):
            generator = torch.Generator().manual_seed(recipe.seed * 1_000_003 + progress.done)
            loss = diffusion_loss(pipe, scheduler, latents[index], [rows[i] for i in index], generator, on_gpu)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            progress.step(epoch, recipe.epochs, losses[-1], force=len(losses) == per_epoch)
        seconds = round(time.monotonic() - started, 2)  # the steps' time, what a longer run scales with
        path = checkpoints / checkpoint_name(name, epoch)
        metadata = kohya_metadata(recipe, examples, epoch, epoch * per_epoch, name)
        save_file(adapters.kohya_tensors(), str(path), metadata=metadata)
        torch.save(
            {"epoch": epoch, "optimizer": optimizer.state_dict(), "recipe": asdict(recipe)}, checkpoints / STATE_FILE
        )
        files.append(path)
        if on_epoch is not None:
            on_epoch(EpochLog(epoch, per_epoch, float(np.mean(losses)), seconds, path.name))
    return files


def checkpoint_name(name: str, epoch: int) -> str:
    return f"{name}-{epoch:06d}.safetensors"  # kohya's naming: bespoke_punks-000007.safetensors


def encode_latents(pipe, examples: list[Example], recipe: Recipe, device: str) -> torch.Tensor:
    """(N, 4, resolution/8, resolution/8): each sprite upscaled nearest, encoded once (a sample of the VAE's
    distribution, seeded), scaled as the UNet expects."""
    generator = torch.Generator(device).manual_seed(recipe.seed)
    latents = []
    with torch.no_grad():
        for example in examples:
            pixels = np.asarray(upscale(example.sprite, recipe.resolution).convert("RGB"), dtype=np.float32)
            image = torch.from_numpy(pixels / 127.5 - 1).permute(2, 0, 1)[None].to(device, pipe.vae.dtype)
            sample = pipe.vae.encode(image).latent_dist.sample(generator)
            latents.append(sample.float() * pipe.vae.config.scaling_factor)
    return torch.cat(latents)


def caption_ids(tokenizer, caption: str) -> list[int]:
    """The caption's CLIP tokens, without BOS/EOS."""
    return tokenizer(caption, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]


def diffusion_loss(pipe, scheduler, latents, rows: list[list[int]], generator, on_gpu: bool) -> torch.Tensor:
    """MSE between the noise added at random timesteps and the UNet's prediction of it."""
    device = pipe.unet.device
    latents = latents.to(device)
    noise = torch.randn(latents.shape, generator=generator).to(device)
    steps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator).to(device)
    noisy = scheduler.add_noise(latents, noise, steps)
    chunks = max(1, max(math.ceil(len(r) / CHUNK_TOKENS) for r in rows))
    ids = [row for r in rows for row in chunk_input_ids(pipe.tokenizer, tuple(r), chunks)]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext()
    with autocast:
        hidden = pipe.text_encoder(torch.tensor(ids, device=device))[0]
        context = hidden.reshape(len(rows), -1, hidden.shape[-1])
        prediction = pipe.unet(noisy.to(pipe.unet.dtype), steps, context).sample
    return F.mse_loss(prediction.float(), noise)


def _resume(checkpoints: Path, adapters: KohyaLoraAdapters, optimizer, recipe: Recipe) -> int:
    """Load the last finished epoch of an earlier run in `checkpoints`; how many epochs it finished (0: none)."""
    state_file = checkpoints / STATE_FILE
    if not state_file.is_file():
        return 0
    state = torch.load(state_file, weights_only=True)
    earlier = {k: v for k, v in state["recipe"].items() if k != "epochs"}
    if earlier != {k: v for k, v in asdict(recipe).items() if k != "epochs"}:
        raise ValueError(
            f"out: {checkpoints} holds a run with other settings ({state['recipe']}); "
            "use another output folder, or the same settings to resume it"
        )
    last = sorted(checkpoints.glob(f"*-{state['epoch']:06d}.safetensors"))
    if not last:
        raise ValueError(f"out: {state_file} says epoch {state['epoch']} finished but its checkpoint is missing")
    adapters.load_kohya(last[-1])
    optimizer.load_state_dict(state["optimizer"])
    log.info("resuming after epoch %d of %d (%s)", state["epoch"], recipe.epochs, last[-1].name)
    return int(state["epoch"])


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )
