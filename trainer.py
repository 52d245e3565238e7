"""Cog trainings for Replicate (cog.yaml `train: "trainer.py:train"`): a .zip of pixel-art portraits in, the best
epoch's kohya LoRA out, which the inference model's `lora_weights` takes as it is. The same training as `punks train`
(service/training/run.py): the data is checked before the base model loads, the recipe that worked is the default
(rank 32 / alpha 16, 10 epochs at 512 px) and every epoch is ranked by `lora evaluate`; progress (epoch, step, loss,
time left) goes to the training's logs.

`input_images` is a string, as predict.py's `image`: an https URL, downloaded under the strict download policy
(service/weights/inputs.py, as a caller's lora_weights: public hosts only, checked on every redirect, deadlines)
capped at the data's own limit (service/training/data.py's MAX_TOTAL_BYTES), or a data: URL, decoded under the
same cap. A Cog `Path` input would have coglet fetch any URL itself, any host included, before train() starts.
Replicate's clients upload a local file and send its URL, so they work unchanged.

Not `train.py`: that name is the train/ package's (the demo model's trainer), which would shadow it.
"""

import dataclasses
import logging
import shutil
import tempfile
from pathlib import Path as FsPath

from cog import BaseModel, Input, Path

from service.config import Settings
from service.training.data import MAX_TOTAL_BYTES
from service.training.recipe import Recipe
from service.training.run import DEFAULT_SUBJECT, Evaluation
from service.training.run import train as train_lora
from service.weights.inputs import read_input
from service.weights.policy import DownloadPolicy
from service.weights.resolve import resolve_weights


class TrainingOutput(BaseModel):
    weights: Path  # the best epoch's .safetensors: pass its URL as lora_weights
    contact_sheet: Path  # every epoch's sprites on the fixed prompts, ranked
    ranking: Path  # ranking.md: the snapper's verdict and scores per epoch
    captions: Path  # captions.zip: the captions trained on, written ones included


def train(
    input_images: str = Input(
        description="An https:// URL or a data: URL of a .zip of pixel-art portraits (at most 512 MiB; fetched from public hosts only): 24x24 sprites, or larger square pixel art the snapper turns into 24x24 sprites, with optional .txt captions of the same name. Missing captions are written from the sprite in the trained format."
    ),
    subject: str = Input(
        default=DEFAULT_SUBJECT,
        description="Word after 'bespoke punk' in written captions (the trained collection: lad, lass).",
    ),
    rank: int = Input(
        default=32,
        ge=1,
        le=256,
        description="Network dim. 32 is the rank that worked; 64 and more gave photographs and are refused unless force is on.",
    ),
    epochs: int = Input(
        default=10, ge=1, le=100, description="Epochs; each is saved and ranked, the best one returned."
    ),
    batch_size: int = Input(default=1, ge=1, le=16, description="Images per step."),
    learning_rate: float = Input(default=1e-4, ge=1e-7, le=0.01, description="UNet learning rate."),
    seed: int = Input(default=0, ge=0, description="Seed of the data order and the noise."),
    eval_steps: int = Input(
        default=25,
        ge=1,
        le=100,
        description="Denoising steps of each epoch's evaluation images (fixed prompts and seeds).",
    ),
    force: bool = Input(default=False, description="Train settings the seed's runs refute (rank 64 or more)."),
) -> TrainingOutput:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = Settings()
    out = FsPath(tempfile.mkdtemp(prefix="punks-train-"))
    recipe = Recipe(
        rank=rank, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed, force=force
    )
    policy = dataclasses.replace(DownloadPolicy.for_settings(settings), max_bytes=MAX_TOTAL_BYTES)
    with tempfile.TemporaryDirectory(prefix="punks-train-data-") as data:
        archive = FsPath(data) / "input_images.zip"
        with archive.open("wb") as file:  # RequestError naming input_images: the training fails with it
            read_input(input_images, "input_images", policy, file)
        result = train_lora(
            archive,
            out,
            resolve_weights(settings).base_model,
            recipe,
            subject,
            evaluation=Evaluation(steps=eval_steps),
            resume=False,
        )
    captions = shutil.make_archive(str(out / "captions"), "zip", result.captions)
    return TrainingOutput(
        weights=Path(result.lora),
        contact_sheet=Path(result.contact_sheet),
        ranking=Path(result.ranking),
        captions=Path(captions),
    )
