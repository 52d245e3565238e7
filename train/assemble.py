"""Turn training runs' flat files into the shipped demo model: a diffusers folder in fp16 (SD1.5's layout,
tokenizer linked to the package's CLIP tokenizer) and the rank-32 kohya LoRA, as devtools/demo.py loads them.

    python -m train.assemble RUN [RUN ...]     # writes devtools/demo_model/; a later RUN's file wins

so that a run continued in another folder (python -m train.run --resume RUN --only ...) replaces what it trained.
The runs' logs go, in order, into the training log.

    python -m train.assemble --unpack RUN      # the shipped model back into a run's flat files, to train on from
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from devtools.demo import DEMO_DIR, DEMO_FOLDER, DEMO_LOG, DEMO_LORA
from train import model
from train.run import load_into, save_fp16


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
    logs = []
    for run in runs:
        log = json.loads((run / "log.json").read_text())
        logs += log if isinstance(log, list) else [log | {"folder": run.name}]  # a list: an unpacked model's logs
    (into / DEMO_LOG).write_text(json.dumps(logs, indent=1) + "\n")
    return into


def unpack(into: Path, shipped: Path = DEMO_DIR) -> Path:
    """The shipped model's files as train/run.py writes them (flat, fp16), so that `--resume` / `--init` can go
    on training it."""
    vae, unet, text_encoder = model.vae(), model.unet(), model.text_encoder()
    pipe = StableDiffusionPipeline.from_pretrained(shipped / DEMO_FOLDER, variant="fp16", safety_checker=None)
    vae.load_state_dict(pipe.vae.state_dict())
    unet.load_state_dict(pipe.unet.state_dict())
    text_encoder.load_state_dict(pipe.text_encoder.state_dict())
    into.mkdir(parents=True, exist_ok=True)
    save_fp16(vae, into / "vae.safetensors", {"scaling_factor": repr(pipe.vae.config.scaling_factor)})
    save_fp16(unet, into / "unet.safetensors")
    save_fp16(text_encoder, into / "text_encoder.safetensors")
    shutil.copy(shipped / DEMO_LORA, into / "lora32.safetensors")
    shutil.copy(shipped / DEMO_LOG, into / "log.json")  # its runs' logs, which assemble puts first
    return into


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m train.assemble", description=__doc__.split("\n\n")[0])
    cli.add_argument("runs", type=Path, nargs="*", help="folders written by python -m train.run, oldest first")
    cli.add_argument("--into", type=Path, default=DEMO_DIR)
    cli.add_argument("--unpack", type=Path, help="write the shipped model's flat files into this folder instead")
    args = cli.parse_args()
    if args.unpack:
        print(unpack(args.unpack))
    elif args.runs:
        print(assemble(args.runs, args.into))
    else:
        cli.error("give the runs to assemble, or --unpack FOLDER")
