"""Turn a training run's flat files into the shipped demo model: a diffusers folder in fp16 (SD1.5's layout,
tokenizer linked to the package's CLIP tokenizer) and the rank-32 kohya LoRA, as devtools/demo.py loads them.

    python -m train.assemble RUN_DIR            # writes devtools/demo_model/
"""

import argparse
import shutil
from pathlib import Path

import torch

from devtools.demo import DEMO_DIR, DEMO_FOLDER, DEMO_LOG, DEMO_LORA
from train import model
from train.run import load_into


def assemble(run: Path, into: Path) -> Path:
    vae, unet, text_encoder = model.vae(), model.unet(), model.text_encoder()
    metadata = load_into(vae, run / "vae.safetensors")
    vae.register_to_config(scaling_factor=float(metadata["scaling_factor"]))
    load_into(unet, run / "unet.safetensors")
    load_into(text_encoder, run / "text_encoder.safetensors")
    pipe = model.pipeline(unet, vae, text_encoder).to(torch.float16)
    if into.exists():
        shutil.rmtree(into)
    folder = into / DEMO_FOLDER
    pipe.save_pretrained(folder, safe_serialization=True, variant="fp16")
    shutil.rmtree(folder / "tokenizer")  # SD1.5's CLIP tokenizer ships in the package already
    (folder / "tokenizer").symlink_to(Path("../../../service/sd15_config/tokenizer"))
    shutil.copy(run / "lora32.safetensors", into / DEMO_LORA)
    shutil.copy(run / "log.json", into / DEMO_LOG)
    return into


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m train.assemble", description=__doc__.split("\n\n")[0])
    cli.add_argument("run", type=Path, help="folder written by python -m train.run")
    cli.add_argument("--into", type=Path, default=DEMO_DIR)
    print(assemble(cli.parse_args().run, cli.parse_args().into))
