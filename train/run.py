"""Train the demo model in one time-boxed run: the text encoder (pretrained to name the portraits' attributes), the
VAE, then the base UNet on smooth renderings (the text encoder frozen), then the rank-32 / alpha-16 kohya LoRA on
crisp renderings (and, with time left, a rank-64 one), then a small evaluation.

    python -m train.run --out DIR --seconds 480            # on the GPU; everything lands in DIR as it goes
    python -m train.run --out DIR --resume DIR --seconds 300   # skips the phases whose files DIR already has
    python -m train.run --out NEW --resume DIR --init DIR --only vae base lora32   # trains those on from DIR's
    python -m train.run --out /tmp/dry --tiny              # CPU dry run: a few steps of every phase

Each phase gets a share of --seconds; its step count is fixed after timing its first steps (and logged), so a
run is seeded and repeatable for the same step counts (--steps-from LOG replays them). Files (fp16 safetensors,
in one flat folder): vae/unet/text_encoder.safetensors, lora32.safetensors, lora64.safetensors, log.json,
samples.png. `python -m train.assemble` turns them into the shipped folder.
"""

import argparse
import contextlib
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from diffusers import DDPMScheduler
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTokenizer

from devtools.random_lora import kohya_metadata
from service.config import SD15_CONFIG_DIR
from service.lora.fuse import kohya_targets
from service.prompts import NEGATIVE_PROMPT, build_prompt, chunk_input_ids
from train import model, render, sprites

CHUNK = 77
# rest: data, encoding, evaluation; lora64 only runs if the others finish early
PHASE_SHARES = {"text": 0.03, "vae": 0.20, "base": 0.47, "lora32": 0.27, "lora64": 0.10}
LORA_ALPHA = 16.0
NULL_CAPTION_RATE = 0.1  # half "", half the service's negative prompt: what classifier-free guidance uses
EVAL_PROMPTS = (
    "lad with a red beanie, green background",
    "punk with a cap, blue background",
    "punk with a cap, red background",
    "lad with sunglasses, yellow background",
)
SEPARATION_PAIRS = {  # prompts that differ in one attribute: how far apart the text encoder puts them
    "background": ("punk with a cap, blue background", "punk with a cap, red background"),
    "hat": ("punk with a cap, blue background", "punk with a top hat, blue background"),
    "glasses": ("lad with sunglasses, yellow background", "lad, yellow background"),
    "empty": ("punk with a cap, blue background", None),  # None: "", the engine's unconditional prompt
}


@dataclass
class Config:
    sprites: int = 8192
    batch: int = 64
    vae_batch: int = 64
    vae_crop: int = 128
    lr: float = 1e-3
    text_batch: int = 256
    text_lr: float = 6e-3
    held_out: int = 512  # portraits whose captions measure the text phase's attribute accuracy
    lora_lr: float = 2e-3
    lora_text_lr: float = 2e-4  # the LoRA's CLIP layers: low, so diffusion gradients keep the text phase's attributes
    noise_offset: float = 0.1  # see diffusion_loss
    max_steps: int | None = None  # caps every phase (dry runs)
    eval_steps: int = 25
    eval_seeds: tuple[int, ...] = (0, 1, 2, 3)
    latent_crop: int | None = None  # encode crops of this many px of larger renderings (a CPU's LoRA: 512 detail)
    sizes: tuple[int, ...] = (512, 256)  # 512 as the real data; 256 too, so a CPU test can draw many seeds quickly


@dataclass
class Log:
    started: float = field(default_factory=time.time)
    phases: dict = field(default_factory=dict)

    def phase(self, name: str, **values) -> None:
        self.phases[name] = self.phases.get(name, {}) | values
        print(f"[{time.time() - self.started:6.1f}s] {name}: {values}", flush=True)


def autocast(device: str):
    """bf16 autocast on the GPU; float32 on the CPU (continuations of a run on a machine without a GPU)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()


def seeded(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def timed_steps(budget_s: float, step, log: Log, name: str, cap: int | None, replay: int | None) -> int:
    """Run `step(i, total)` for as many steps as fit in budget_s, or `replay` steps. The speed is measured over
    steps 5-15 (the first ones compile kernels and tune convolutions); total is fixed (and logged) at step 15."""
    start = time.time()
    total = replay or cap or 10**9
    probe_from, probe_to = 5, 15
    for i in range(total):
        if i == probe_from:
            probe_start = time.time()
        if i == probe_to and replay is None and cap is None:
            per_step = (time.time() - probe_start) / (probe_to - probe_from)
            total = probe_to + max(1, int((budget_s - (time.time() - start)) / per_step))
            log.phase(name, step_s=round(per_step, 4), steps=total)
        if i >= total:
            break
        loss = step(i, total)
        if i % 100 == 0 or i == total - 1:
            print(f"  {name} step {i}/{total} loss {loss:.4f}", flush=True)
    log.phase(name, steps=total, seconds=round(time.time() - start, 1), final_loss=round(loss, 5))
    return total


def learning_rate(i: int, total: int, peak: float, warmup: int = 100) -> float:
    warm = min(1.0, (i + 1) / min(warmup, max(1, total // 10)))
    return peak * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / max(1, total))))


def apply_gradients(optimizer: torch.optim.Optimizer, loss: torch.Tensor, lr: float, clip: list | None = None) -> float:
    """One optimizer step of `loss` at learning rate `lr` (times a parameter group's "scale", where it has one),
    the gradient norm of `clip` (parameters) capped at 1 where given; returns the loss's value, for the phase's log."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("scale", 1.0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    optimizer.step()
    return loss.item()


# --- data ----------------------------------------------------------------------------------------


@dataclass
class Captions:
    ids: torch.Tensor  # (N, variants, chunks, 77) token rows as the engine builds them
    chunks: torch.Tensor  # (N, variants) chunks each caption uses; the rest is masked out
    null_ids: torch.Tensor  # (2, chunks, 77): "" and the negative prompt
    max_chunks: int


def caption_rows(tokenizer: CLIPTokenizer, text: str) -> tuple[list[list[int]], int]:
    """The text's token rows as the engine builds them (BOS, 75 tokens, EOS, padding) and how many it needs."""
    ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    needed = max(1, -(-len(ids) // (CHUNK - 2)))
    return chunk_input_ids(tokenizer, tuple(ids), needed), needed


def tokenize(captions: list[list[str]], tokenizer: CLIPTokenizer) -> Captions:
    encoded = [[caption_rows(tokenizer, text) for text in variants] for variants in captions]
    null = [caption_rows(tokenizer, "")[0], caption_rows(tokenizer, NEGATIVE_PROMPT)[0][:1]]
    most = max(n for variants in encoded for _, n in variants)
    filler = null[0][0]

    def padded(r: list[list[int]]) -> list[list[int]]:
        return r + [filler] * (most - len(r))

    return Captions(
        ids=torch.tensor([[padded(r) for r, _ in variants] for variants in encoded]),
        chunks=torch.tensor([[n for _, n in variants] for variants in encoded]),
        null_ids=torch.tensor([padded(r) for r in null]),
        max_chunks=most,
    )


def make_data(count: int, seed: int) -> tuple[np.ndarray, list[list[str]], torch.Tensor]:
    """Sprites, two captions each (the seed's full format and a short user-style one in the prompt template) and
    the attributes each caption names: labels (count, 2, attributes), class indices of sprites.ATTRIBUTES, -1 where
    that caption does not name the attribute."""
    rng = np.random.default_rng(seed)
    punks = [sprites.random_punk(rng) for _ in range(count)]
    images = np.stack([sprites.render(p) for p in punks])
    captions, labels = [], []
    for punk, sprite in zip(punks, images, strict=True):
        words, named = sprites.short_description(punk, rng)
        captions.append([sprites.full_caption(punk, sprite), build_prompt(words)])
        labels.append(
            [sprites.attribute_labels(punk, sprites.full_caption_names(punk)), sprites.attribute_labels(punk, named)]
        )
    return images, captions, torch.tensor(labels)


def batch_captions(captions: Captions, index: torch.Tensor, generator: torch.Generator, device: str):
    """Token rows (B*chunks, 77) and the cross-attention mask (B, chunks*77) of a batch, with null captions.

    A null caption keeps the chunk count of the caption it replaces, with its padding chunks visible, as the
    engine encodes the negative prompt to the prompt's chunk count."""
    size = len(index)
    variant = torch.randint(0, 2, (size,), generator=generator)
    ids = captions.ids[index, variant].clone()
    chunks = captions.chunks[index, variant].clone()
    null = torch.rand(size, generator=generator) < NULL_CAPTION_RATE
    which = torch.randint(0, 2, (size,), generator=generator)
    ids[null] = captions.null_ids[which[null]]
    mask = chunk_mask(chunks, captions.max_chunks)
    return ids.view(-1, CHUNK).to(device), mask.to(device)


def encode_text(text_encoder, ids: torch.Tensor, batch: int) -> torch.Tensor:
    hidden = text_encoder(ids)[0]
    return hidden.reshape(batch, -1, hidden.shape[-1])


def chunk_mask(chunks: torch.Tensor, max_chunks: int) -> torch.Tensor:
    """(B, max_chunks*77): the tokens of the chunks a caption uses, what the UNet's cross-attention sees."""
    return (torch.arange(max_chunks).view(1, -1) < chunks.view(-1, 1)).repeat_interleave(CHUNK, dim=1)


# --- phases ---------------------------------------------------------------------------------------


class AttributeHeads(torch.nn.Module):
    """Linear classifiers of the portrait's attributes from a caption's final hidden states (the UNet's context):
    each reads the mean over the caption's tokens and an attention readout with its own query (one head of
    cross-attention), so the attributes end up in the token states the UNet attends to. Thrown away after training."""

    def __init__(self, width: int, classes: list[int]):
        super().__init__()
        self.query = torch.nn.Parameter(torch.randn(len(classes), width) / math.sqrt(width))
        self.heads = torch.nn.ModuleList(torch.nn.Linear(2 * width, n) for n in classes)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        scores = torch.einsum("btw,aw->bat", hidden, self.query) / math.sqrt(hidden.shape[-1])
        weights = scores.masked_fill(~mask[:, None], -torch.inf).softmax(-1)
        attended = torch.einsum("bat,btw->baw", weights, hidden)
        return [head(torch.cat([mean, attended[:, a]], -1)) for a, head in enumerate(self.heads)]


def attribute_logits(text_encoder, heads, captions: Captions, index, variant, device: str) -> list[torch.Tensor]:
    ids = captions.ids[index, variant].reshape(-1, CHUNK).to(device)
    mask = chunk_mask(captions.chunks[index, variant], captions.max_chunks).to(device)
    with autocast(device):
        hidden = encode_text(text_encoder, ids, len(index))
    return heads(hidden.float(), mask)


def attribute_loss(logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per attribute over the captions that name it, summed over the attributes."""
    losses = [
        F.cross_entropy(x, y, ignore_index=-1, reduction="sum") / (y >= 0).sum().clamp(min=1)
        for x, y in zip(logits, labels.unbind(1), strict=True)
    ]
    return torch.stack(losses).sum()


@torch.no_grad()
def attribute_accuracy(text_encoder, heads, captions: Captions, labels: torch.Tensor, device: str) -> dict:
    """Share of named attributes the heads get right, per attribute, over both captions of every portrait."""
    right, named = torch.zeros(labels.shape[-1]), torch.zeros(labels.shape[-1])
    for variant in (0, 1):
        for index in torch.arange(len(labels)).split(256):
            logits = attribute_logits(text_encoder, heads, captions, index, torch.full_like(index, variant), device)
            target = labels[index, variant]
            for a, x in enumerate(logits):
                known = target[:, a] >= 0
                right[a] += (x.argmax(-1).cpu() == target[:, a])[known].sum()
                named[a] += known.sum()
    share = {name: round(float(r / n), 3) for name, r, n in zip(sprites.ATTRIBUTES, right, named, strict=True)}
    return {"mean": round(float(right.sum() / named.sum()), 3), **share}


@torch.no_grad()
def prompt_separation(text_encoder, tokenizer: CLIPTokenizer, device: str) -> dict[str, float]:
    """Relative distance ||a - b|| / ||a|| of the (77, width) hidden states of SEPARATION_PAIRS' prompts in the
    service's template (the second one of "empty" is "", the unconditional prompt)."""

    def hidden(prompt: str | None) -> torch.Tensor:
        rows, _ = caption_rows(tokenizer, build_prompt(prompt) if prompt is not None else "")
        return text_encoder(torch.tensor(rows[:1], device=device))[0].float()

    result = {}
    for name, (first, second) in SEPARATION_PAIRS.items():
        a, b = hidden(first), hidden(second)
        result[name] = round(float((a - b).norm() / a.norm()), 4)
    return result


def train_text(
    captions: Captions,
    labels: torch.Tensor,
    held_out: tuple[Captions, torch.Tensor],
    cfg: Config,
    budget,
    log,
    device,
    replay,
):
    """Pretrain the text encoder from scratch to name each caption's attributes (AttributeHeads, cross-entropy
    on the attributes the caption names): diffusion gradients alone leave a new encoder's output almost the same
    for every prompt, so the UNet would have nothing to condition on. `held_out`: (captions, labels) of other
    portraits, to measure the accuracy."""
    generator = seeded(5)
    tokenizer = CLIPTokenizer.from_pretrained(SD15_CONFIG_DIR / "tokenizer")
    text_encoder = model.text_encoder().to(device).train()
    heads = AttributeHeads(model.TEXT_WIDTH, [len(v) for v in sprites.ATTRIBUTES.values()]).to(device)
    log.phase("text", separation_before=prompt_separation(text_encoder, tokenizer, device))
    parameters = [*text_encoder.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=cfg.text_lr, weight_decay=1e-2)

    def step(i: int, total: int) -> float:
        index = torch.randint(0, len(labels), (cfg.text_batch,), generator=generator)
        variant = torch.randint(0, 2, (cfg.text_batch,), generator=generator)
        logits = attribute_logits(text_encoder, heads, captions, index, variant, device)
        loss = attribute_loss(logits, labels[index, variant].to(device))
        return apply_gradients(optimizer, loss, learning_rate(i, total, cfg.text_lr), parameters)

    timed_steps(budget, step, log, "text", cfg.max_steps, replay)
    text_encoder.eval()
    log.phase(
        "text",
        separation=prompt_separation(text_encoder, tokenizer, device),
        held_out_accuracy=attribute_accuracy(text_encoder, heads, held_out[0], held_out[1], device),
    )
    return text_encoder


def vae_batch(
    sprite_tensor: torch.Tensor, cfg: Config, i: int, generator: torch.Generator, device: str, align: int = 1
) -> torch.Tensor:
    """One batch for the autoencoder: half crisp, half smooth renderings of random sprites at step i's size, one
    random crop of cfg.vae_crop whose corner is a multiple of `align`."""
    index = torch.randint(0, len(sprite_tensor), (cfg.vae_batch,), generator=generator)
    size = cfg.sizes[i % len(cfg.sizes)]
    chosen = sprite_tensor[index].to(device)
    half = cfg.vae_batch // 2
    images = torch.cat([render.crisp(chosen[:half], size), render.smooth(chosen[half:], size)])
    crop = min(cfg.vae_crop, size)
    y, x = (align * int(v) for v in torch.randint(0, (size - crop) // align + 1, (2,), generator=generator))
    return images[:, :, y : y + crop, x : x + crop]


def train_vae(
    sprite_tensor: torch.Tensor, cfg: Config, budget: float, log: Log, device: str, replay, init: Path | None = None
) -> torch.nn.Module:
    """Autoencoder on random crops of both renderings at both sizes, from scratch or on from `init`: L1 + a little
    KL, as SD's VAE, plus L1 of the 8x8-pixel means (one latent cell), which weighs a region's colour more: a VAE
    trained on L1 alone decoded a red or green background as the same brown, so no UNet could draw them apart."""
    generator = seeded(1)
    vae = model.vae()
    if init is not None:
        load_into(vae, init)
    vae = vae.to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)

    def step(i: int, total: int) -> float:
        images = vae_batch(sprite_tensor, cfg, i, generator, device)
        with autocast(device):
            posterior = vae.encode(images).latent_dist
            decoded = vae.decode(posterior.sample()).sample
        cells = F.l1_loss(F.avg_pool2d(decoded.float(), 8), F.avg_pool2d(images, 8))
        loss = F.l1_loss(decoded.float(), images) + cells + 1e-6 * posterior.kl().mean()
        return apply_gradients(optimizer, loss, learning_rate(i, total, cfg.lr))

    timed_steps(budget, step, log, "vae", cfg.max_steps, replay)
    return vae.eval()


def train_decoder(vae, sprite_tensor: torch.Tensor, cfg: Config, budget: float, log: Log, device: str, replay):
    """More training for the VAE's decoder alone, the encoder frozen: the latents (and so the UNet trained on
    them) stay the same while the colours and edges it draws get better."""
    generator = seeded(4)
    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True)
    vae.post_quant_conv.requires_grad_(True)
    parameters = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=0.0)

    def step(i: int, total: int) -> float:
        images = vae_batch(sprite_tensor, cfg, i, generator, device, align=8)  # latent-aligned crops
        with torch.no_grad(), autocast(device):
            latent = vae.encode(images).latent_dist.mean
        with autocast(device):
            decoded = vae.decode(latent).sample
        loss = F.l1_loss(decoded.float(), images)
        return apply_gradients(optimizer, loss, learning_rate(i, total, cfg.lr))

    timed_steps(budget, step, log, "decoder", cfg.max_steps, replay)
    vae.requires_grad_(False)
    return vae.eval()


@torch.no_grad()
def encode_latents(
    vae, sprite_tensor: torch.Tensor, cfg: Config, device: str, log: Log, known_scaling: bool, kinds: list[str]
) -> dict[tuple[str, int], torch.Tensor]:
    """Latents (mean of the posterior, times the scaling factor) of every sprite, both renderings, both sizes.
    A new VAE gets its scaling factor here (1 / std of the latents); a trained one keeps its own."""
    start = time.time()
    raw: dict[tuple[str, int], list[torch.Tensor]] = {}
    for size in cfg.sizes:
        for name, draw in (("smooth", render.smooth), ("crisp", render.crisp)):
            if name not in kinds:
                continue
            for chunk in sprite_tensor.split(256):
                images = draw(chunk.to(device), size)
                if cfg.latent_crop and size > cfg.latent_crop:
                    crop = cfg.latent_crop
                    y, x = (8 * int(v) for v in torch.randint(0, (size - crop) // 8 + 1, (2,)))
                    images = images[:, :, y : y + crop, x : x + crop]
                with autocast(device):
                    mean = vae.encode(images).latent_dist.mean
                raw.setdefault((name, size), []).append(mean.to(torch.bfloat16))
    latents = {key: torch.cat(parts) for key, parts in raw.items()}
    scaling = vae.config.scaling_factor
    if not known_scaling:
        scaling = float(1 / latents[(kinds[0], cfg.sizes[0])].float().std())
        vae.register_to_config(scaling_factor=scaling)
    log.phase("encode", seconds=round(time.time() - start, 1), scaling_factor=round(scaling, 5))
    return {key: (value.float() * scaling).to(torch.bfloat16) for key, value in latents.items()}


def diffusion_loss(
    unet, text_encoder, latents, captions, index, scheduler, generator, device, noise_offset: float
) -> torch.Tensor:
    """SD1.5's epsilon objective with min-SNR-5 weighting (converges faster in a short run) and offset noise
    (kohya's --noise_offset): SD's schedule leaves a trace of the image's mean colour at its last step, so a model
    trained without it takes the picture's overall colour from the seed's noise, not from the prompt ("green
    background" drawn blue); a random per-channel offset of the noise teaches it to set the mean colour itself."""
    clean = latents[index.to(latents.device)].float().to(device)
    noise = torch.randn_like(clean)  # the global generator, seeded per phase, on the device: no host copy
    noise = noise + noise_offset * torch.randn(*clean.shape[:2], 1, 1, device=device)
    steps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), device=device)
    noisy = scheduler.add_noise(clean, noise, steps)
    ids, mask = batch_captions(captions, index, generator, device)
    with autocast(device):
        context = encode_text(text_encoder, ids, len(index))
        prediction = unet(noisy, steps, context, encoder_attention_mask=mask).sample
    alphas = scheduler.alphas_cumprod.to(device)[steps]
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=5.0) / snr
    per_sample = F.mse_loss(prediction.float(), noise, reduction="none").mean(dim=(1, 2, 3))
    return (weight * per_sample).mean()


def train_base(latents, captions, text_encoder, cfg, budget, log, device, replay, init: Path | None = None):
    """The UNet from scratch, or on from `init` (an earlier run's unet.safetensors); the pretrained text encoder
    stays frozen (as SD's CLIP), so it keeps naming the attributes the text phase taught it and costs no backward
    pass."""
    generator = seeded(2)
    unet = model.unet()
    if init is not None:
        load_into(unet, init)
    unet = unet.to(device).train()
    text_encoder.requires_grad_(False).eval()
    scheduler = DDPMScheduler.from_pretrained(SD15_CONFIG_DIR / "scheduler")
    parameters = list(unet.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=1e-2)

    def step(i: int, total: int) -> float:
        size = cfg.sizes[i % len(cfg.sizes)]
        pool = latents[("smooth", size)]
        index = torch.randint(0, len(pool), (cfg.batch,), generator=generator)
        loss = diffusion_loss(unet, text_encoder, pool, captions, index, scheduler, generator, device, cfg.noise_offset)
        return apply_gradients(optimizer, loss, learning_rate(i, total, cfg.lr), parameters)

    timed_steps(budget, step, log, "base", cfg.max_steps, replay)
    return unet.eval()


class KohyaLora(torch.nn.Module):
    """kohya's networks.lora on every layer it wraps: out + (alpha / rank) * up(down(x)), up starting at zero."""

    def __init__(self, targets: dict[str, torch.nn.Linear | torch.nn.Conv2d], rank: int, alpha: float):
        super().__init__()
        self.rank, self.alpha, self.names = rank, alpha, list(targets)
        self.down: dict[str, torch.nn.Linear | torch.nn.Conv2d] = torch.nn.ModuleDict()  # type: ignore[assignment]
        self.up: dict[str, torch.nn.Linear | torch.nn.Conv2d] = torch.nn.ModuleDict()  # type: ignore[assignment]
        self.hooks = []
        for name, layer in targets.items():
            key = name.replace(".", "_")
            down: torch.nn.Linear | torch.nn.Conv2d
            up: torch.nn.Linear | torch.nn.Conv2d
            if isinstance(layer, torch.nn.Conv2d):
                down = torch.nn.Conv2d(layer.in_channels, rank, 1, bias=False)
                up = torch.nn.Conv2d(rank, layer.out_channels, 1, bias=False)
            else:
                down = torch.nn.Linear(layer.in_features, rank, bias=False)
                up = torch.nn.Linear(rank, layer.out_features, bias=False)
            torch.nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            torch.nn.init.zeros_(up.weight)
            self.down[key], self.up[key] = down, up
            self.hooks.append(layer.register_forward_hook(self._hook(key)))

    def _hook(self, key: str):
        def add(module, inputs, output):
            return output + (self.alpha / self.rank) * self.up[key](self.down[key](inputs[0]))

        return add

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def load_kohya_tensors(self, path: Path) -> None:
        """Start from an earlier run's LoRA file (same rank and targets)."""
        tensors = load_file(str(path))
        for name in self.names:
            key = name.replace(".", "_")
            self.down[key].weight.data.copy_(tensors[f"{name}.lora_down.weight"].float())
            self.up[key].weight.data.copy_(tensors[f"{name}.lora_up.weight"].float())

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name in self.names:
            key = name.replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = self.down[key].weight.detach().to(torch.float16).cpu().contiguous()
            tensors[f"{name}.lora_up.weight"] = self.up[key].weight.detach().to(torch.float16).cpu().contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(self.alpha, dtype=torch.float16)
        return tensors


def train_lora(unet, text_encoder, vae, latents, captions, rank, cfg, budget, log, device, replay, init=None):
    """The kohya LoRA on the crisp renderings, from zero or on from `init` (an earlier run's file of this rank);
    its CLIP layers learn at cfg.lora_text_lr (kohya's --text_encoder_lr), its UNet layers at cfg.lora_lr."""
    name = f"lora{rank}"
    generator = seeded(3 + rank)
    pipe = model.pipeline(unet, vae, text_encoder)
    for part in (unet, text_encoder):
        part.requires_grad_(False)
    lora = KohyaLora(kohya_targets(pipe), rank, LORA_ALPHA)
    if init is not None:
        lora.load_kohya_tensors(init)
    lora = lora.to(device)
    scheduler = DDPMScheduler.from_pretrained(SD15_CONFIG_DIR / "scheduler")
    text_keys = [n.replace(".", "_") for n in lora.names if n.startswith("lora_te_")]
    text = [p for key in text_keys for p in (*lora.down[key].parameters(), *lora.up[key].parameters())]
    text_ids = {id(p) for p in text}
    groups = [
        {"params": [p for p in lora.parameters() if id(p) not in text_ids]},
        {"params": text, "scale": cfg.lora_text_lr / cfg.lora_lr},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lora_lr, weight_decay=0.0)

    def step(i: int, total: int) -> float:
        size = cfg.sizes[i % len(cfg.sizes)]
        pool = latents[("crisp", size)]
        index = torch.randint(0, len(pool), (cfg.batch,), generator=generator)
        loss = diffusion_loss(unet, text_encoder, pool, captions, index, scheduler, generator, device, cfg.noise_offset)
        return apply_gradients(optimizer, loss, learning_rate(i, total, cfg.lora_lr))

    steps = timed_steps(budget, step, log, name, cfg.max_steps, replay)
    return lora, steps


def lora_metadata(rank: int, steps: int, cfg: Config) -> dict[str, str]:
    return kohya_metadata(
        rank,
        LORA_ALPHA,
        ss_num_epochs="1",
        ss_epoch="1",
        ss_max_train_steps=str(steps),
        ss_num_train_images=str(cfg.sprites),
        ss_batch_size_per_device=str(cfg.batch),
        ss_learning_rate=str(cfg.lora_lr),
        ss_unet_lr=str(cfg.lora_lr),
        ss_text_encoder_lr=str(cfg.lora_text_lr),
        ss_noise_offset=str(cfg.noise_offset),
        ss_output_name=f"bespoke_punks_demo_dim{rank}",
        ss_resolution="(512, 512)",
        ss_training_comment="demo model: trained by train/run.py on generated portraits (crisp nearest renderings)",
        ss_tag_frequency=json.dumps({"generated punks": {"pixel art": cfg.sprites, "24x24": cfg.sprites}}),
    )


# --- evaluation -----------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(unet, text_encoder, vae, cfg: Config, device: str) -> dict:
    """The pipeline as the service runs it (DPM++, the prompt template, the negative prompt) on a few prompts."""
    from service.pixelart import to_pixel_art

    pipe = model.pipeline(unet, vae, text_encoder).to(device)
    pipe.set_progress_bar_config(disable=True)
    images, verdicts = [], []
    seeds = cfg.eval_seeds
    for prompt in EVAL_PROMPTS:
        out = pipe(
            [build_prompt(prompt)] * len(seeds),
            negative_prompt=[NEGATIVE_PROMPT] * len(seeds),
            num_inference_steps=cfg.eval_steps,
            guidance_scale=7.5,
            height=cfg.sizes[0],
            width=cfg.sizes[0],
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        ).images
        images += out
        verdicts += [to_pixel_art(image).quality.is_pixel_art for image in out]
    return {"images": images, "pixel_art_share": sum(verdicts) / len(verdicts)}


def contact_sheet(rows: list[list]) -> Image.Image:

    tile = 192
    columns = max(len(r) for r in rows)
    sheet = Image.new("RGB", (columns * tile, len(rows) * tile), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            sheet.paste(image.resize((tile, tile), Image.Resampling.BILINEAR), (x * tile, y * tile))
    return sheet


# --- main -----------------------------------------------------------------------------------------


def save_fp16(module: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(tensors, str(path), metadata=metadata)


def load_into(module: torch.nn.Module, path: Path) -> dict[str, str]:
    """Load fp16 weights into a float32 module; returns the file's metadata."""
    module.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    with safe_open(str(path), "pt") as file:
        return file.metadata() or {}


def main() -> None:
    cli = argparse.ArgumentParser(prog="python -m train.run", description=__doc__.split("\n\n")[0])
    cli.add_argument("--out", type=Path, required=True)
    cli.add_argument("--resume", type=Path, help="a folder of an earlier run: its finished phases are reused")
    cli.add_argument("--seconds", type=float, default=480.0, help="wall-clock budget of the training phases")
    cli.add_argument(
        "--init", type=Path, help="a folder of an earlier run: the base phase and the LoRAs go on from its files"
    )
    cli.add_argument("--steps-from", type=Path, help="log.json of a run whose step counts to replay")
    cli.add_argument("--tiny", action="store_true", help="CPU dry run: few sprites, 2 steps a phase")
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--ranks", type=int, nargs="+", default=[32, 64], help="LoRA ranks to train, in order")
    cli.add_argument(
        "--only",
        nargs="+",
        choices=[*PHASE_SHARES, "decoder"],
        help="train only these phases (each gets an equal share of --seconds); the others load from --resume",
    )
    cli.add_argument("--sprites", type=int, help="training portraits (default 8192)")
    cli.add_argument("--sizes", type=int, nargs="+", help="renderings' sizes, first one evaluated (512 256)")
    cli.add_argument("--batch", type=int, help="diffusion batch size (64)")
    cli.add_argument("--lr", type=float, help="peak learning rate of the VAE, decoder and base phases (1e-3)")
    cli.add_argument("--text-batch", type=int, help="text phase batch size (256)")
    cli.add_argument("--vae-batch", type=int, help="VAE batch size (64)")
    cli.add_argument("--latent-crop", type=int, help="encode crops of this size of larger renderings")
    cli.add_argument("--vae-crop", type=int, help="VAE crop size (128)")
    cli.add_argument("--eval-steps", type=int, help="sampler steps of the evaluation (25; 0: no evaluation)")
    args = cli.parse_args()

    tiny = Config(
        sprites=32,
        batch=2,
        vae_batch=2,
        vae_crop=32,
        text_batch=4,
        held_out=8,
        max_steps=2,
        eval_steps=2,
        eval_seeds=(0,),
        sizes=(64, 32),
    )
    cfg = tiny if args.tiny else Config()
    overrides = {"sprites": args.sprites, "sizes": tuple(args.sizes or ()), "batch": args.batch}
    overrides |= {"eval_steps": args.eval_steps, "vae_batch": args.vae_batch, "vae_crop": args.vae_crop}
    overrides |= {"latent_crop": args.latent_crop, "lr": args.lr, "text_batch": args.text_batch}
    cfg = Config(**cfg.__dict__ | {k: v for k, v in overrides.items() if v is not None and v != ()})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    args.out.mkdir(parents=True, exist_ok=True)
    resume = args.resume or args.out
    replay = json.loads(args.steps_from.read_text())["phases"] if args.steps_from else {}
    log = Log()
    log.phase(
        "setup",
        device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        versions={m.__name__: m.__version__ for m in (torch, diffusers, transformers)},
        config=cfg.__dict__,
        seconds=args.seconds,
        seed=args.seed,
    )

    def budget(phase: str) -> float:
        return args.seconds / len(args.only) if args.only else PHASE_SHARES[phase] * args.seconds

    def trains(phase: str, file: str) -> bool:
        """Whether this run trains `phase`: asked for, or (without --only) not finished in --resume."""
        return phase in args.only if args.only else not (resume / file).is_file()

    def initial(file: str) -> Path | None:
        """The --init run's file to go on from, if it has one."""
        return args.init / file if args.init and (args.init / file).is_file() else None

    def replayed(phase: str) -> int | None:
        return replay.get(phase, {}).get("steps")

    start = time.time()
    tokenizer = CLIPTokenizer.from_pretrained(SD15_CONFIG_DIR / "tokenizer")
    images, captions_text, labels = make_data(cfg.sprites, args.seed)
    sprite_tensor = render.to_tensor(images)
    captions = tokenize(captions_text, tokenizer)
    log.phase("data", seconds=round(time.time() - start, 1), sprites=cfg.sprites, max_chunks=captions.max_chunks)

    text_encoder = model.text_encoder().to(device)
    if trains("text", "text_encoder.safetensors"):
        _, held_out_text, held_out_labels = make_data(cfg.held_out, args.seed + 1)
        held_out = (tokenize(held_out_text, tokenizer), held_out_labels)
        text_encoder = train_text(captions, labels, held_out, cfg, budget("text"), log, device, replayed("text"))
    else:
        load_into(text_encoder, resume / "text_encoder.safetensors")
        text_encoder.eval()
    save_fp16(text_encoder, args.out / "text_encoder.safetensors")

    vae = model.vae().to(device)
    if trains("vae", "vae.safetensors"):
        vae = train_vae(sprite_tensor, cfg, budget("vae"), log, device, replayed("vae"), initial("vae.safetensors"))
    else:
        metadata = load_into(vae, resume / "vae.safetensors")
        vae.register_to_config(scaling_factor=float(metadata["scaling_factor"]))
        vae.eval()
    lora_trains = any(trains(f"lora{rank}", f"lora{rank}.safetensors") for rank in args.ranks)
    kinds = ["smooth"] * trains("base", "unet.safetensors") + ["crisp"] * lora_trains
    trained_vae = trains("vae", "vae.safetensors")
    latents = encode_latents(vae, sprite_tensor, cfg, device, log, not trained_vae, kinds)
    if args.only and "decoder" in args.only:
        vae = train_decoder(vae, sprite_tensor, cfg, budget("decoder"), log, device, replayed("decoder"))
    save_fp16(vae, args.out / "vae.safetensors", {"scaling_factor": repr(vae.config.scaling_factor)})

    unet = model.unet().to(device)
    if trains("base", "unet.safetensors"):
        init = initial("unet.safetensors")
        unet = train_base(latents, captions, text_encoder, cfg, budget("base"), log, device, replayed("base"), init)
    else:
        load_into(unet, resume / "unet.safetensors")
        unet.eval()
    save_fp16(unet, args.out / "unet.safetensors")
    (args.out / "log.json").write_text(json.dumps(log.__dict__, indent=1))

    evaluation = {"base": evaluate(unet, text_encoder, vae, cfg, device)} if cfg.eval_steps else {}
    for rank in args.ranks:
        phase = f"lora{rank}"
        file = args.out / f"{phase}.safetensors"
        if not trains(phase, f"{phase}.safetensors"):
            continue
        init = initial(f"{phase}.safetensors")
        lora, steps = train_lora(
            unet, text_encoder, vae, latents, captions, rank, cfg, budget(phase), log, device, replayed(phase), init
        )
        save_file(lora.kohya_tensors(), str(file), metadata=lora_metadata(rank, steps, cfg))
        if cfg.eval_steps:
            evaluation[phase] = evaluate(unet, text_encoder, vae, cfg, device)
            log.phase(phase, eval_pixel_art_share=evaluation[phase]["pixel_art_share"])
        lora.remove()
        (args.out / "log.json").write_text(json.dumps(log.__dict__, indent=1))
    if evaluation:
        log.phase("eval", base_pixel_art_share=evaluation["base"]["pixel_art_share"], prompts=list(EVAL_PROMPTS))
        contact_sheet([result["images"] for result in evaluation.values()]).save(args.out / "samples.png")
    log.phase("done", seconds=round(time.time() - log.started, 1))
    (args.out / "log.json").write_text(json.dumps(log.__dict__, indent=1))


if __name__ == "__main__":
    main()
