"""`python -m service evaluate` on a CUDA machine with the full-size random SD1.5 and two random rank-32 LoRAs.

    python -m bench.evaluate_gpu OUT_DIR

Checks that checkpoint evaluation (and the LoRA switch it relies on) runs on CUDA at full size; the images
are noise (random weights), so the ranking itself means nothing here.
"""

import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from devtools.random_lora import kohya_metadata, random_kohya_lora
from devtools.smoke import build_full_size_pipeline, save_random_model

REPO = Path(__file__).resolve().parents[1]


def main(out: Path) -> None:
    weights = Path("/tmp/evaluate-weights")
    pipe = build_full_size_pipeline().to(torch.float16)
    save_random_model(weights, pipe, single_file=False)
    (weights / "loras").mkdir(exist_ok=True)
    save_file(
        random_kohya_lora(pipe, seed=1),
        str(weights / "loras" / "epoch-000009.safetensors"),
        metadata=kohya_metadata(32, 16, ss_epoch="9"),
    )
    import os

    os.environ.update(PUNKS_WEIGHTS_DIR=str(weights), PUNKS_BASE_MODEL=str(weights / "stable-diffusion-v1-5"))
    from service.cli import main as cli

    started = time.perf_counter()
    assert cli(["evaluate", "--seeds", "1", "2", "--steps", "25", "--out", str(out)]) == 0
    print(f"evaluate took {time.perf_counter() - started:.1f}s on {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
