"""Turn training runs' flat files into the shipped demo model: a diffusers folder in fp16 (SD1.5's layout,
tokenizer linked to the package's CLIP tokenizer) and the rank-32 kohya LoRA, as devtools/demo.py loads them.

    python -m train.assemble RUN [RUN ...]     # writes devtools/demo_model/; a later RUN's file wins

so that a run continued in another folder (python -m train.run --resume RUN --only ...) replaces what it trained.
The runs' logs go, in order, into the training log.
"""

import argparse
import json
import shutil
from pathlib import Path

import torch

from devtools.demo import DEMO_DIR, DEMO_FOLDER, DEMO_LOG, DEMO_LORA
from train import model
from train.run import load_into


def latest(runs: list[Path], name: str) -> Path:
    found = [run / name for run in runs if (run / name).is_file()]
    if not found:
        raise SystemExit(f"no run has {name}: {', '.join(map(str, runs))}")
    return found[-1]


def assemble(runs: list[Path], into: Path) -> Path:
    vae, unet, text_encoder = model.vae(), model.unet(), model.text_encoder()
    metadata = load_into(vae, latest(runs, "vae.safetensors"))
    vae.register_to_config(scaling_factor=float(metadata["scaling_factor"]))
    load_into(unet, latest(runs, "unet.safetensors"))
    load_into(text_encoder, latest(runs, "text_encoder.safetensors"))
    pipe = model.pipeline(unet, vae, text_encoder).to(torch.float16)
    if into.exists():
        shutil.rmtree(into)
    folder = into / DEMO_FOLDER
    pipe.save_pretrained(folder, safe_serialization=True, variant="fp16")
    shutil.rmtree(folder / "tokenizer")  # SD1.5's CLIP tokenizer ships in the package already
    (folder / "tokenizer").symlink_to(Path("../../../service/sd15_config/tokenizer"))
    shutil.copy(latest(runs, "lora32.safetensors"), into / DEMO_LORA)
    logs = [json.loads((run / "log.json").read_text()) | {"folder": run.name} for run in runs]
    (into / DEMO_LOG).write_text(json.dumps(logs, indent=1) + "\n")
    return into


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m train.assemble", description=__doc__.split("\n\n")[0])
    cli.add_argument("runs", type=Path, nargs="+", help="folders written by python -m train.run, oldest first")
    cli.add_argument("--into", type=Path, default=DEMO_DIR)
    args = cli.parse_args()
    print(assemble(args.runs, args.into))
