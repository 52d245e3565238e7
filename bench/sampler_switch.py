"""Per-switch cost of the per-request sampler on the compiled engine, on a CUDA GPU:

    python -m bench.sampler_switch [--steps 25] [--repeats 5]

For each sampler: the seconds of a request when the previous one used the same sampler vs another one (the
switch), and dynamo's unique graph count before and after (a switch must compile nothing). Prints JSON.
Uses the smoke model unless PUNKS_WEIGHTS_DIR holds real weights.
"""

import argparse
import json
import statistics
import time

import torch
from torch._dynamo.utils import counters

from service.config import Settings
from service.engine import Engine, GenerationRequest
from service.samplers import SAMPLER_NAMES

PROMPT = "lad with a red beanie, green background"


def timed(engine: Engine, sampler: str, steps: int) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    engine.generate(GenerationRequest(PROMPT, seed=5, num_inference_steps=steps, sampler=sampler))
    torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    engine = Engine.load(Settings(compile=True, batch_buckets=(1, 4)))  # 4: a 4-image request must fit a bucket
    for sampler in SAMPLER_NAMES:
        timed(engine, sampler, args.steps)  # first use of each sampler
    graphs = counters["stats"]["unique_graphs"]
    rows = []
    for index, sampler in enumerate(SAMPLER_NAMES):
        other = SAMPLER_NAMES[index - 1]
        same, switched = [], []
        for _ in range(args.repeats):
            timed(engine, sampler, args.steps)
            same.append(timed(engine, sampler, args.steps))
            timed(engine, other, args.steps)
            switched.append(timed(engine, sampler, args.steps))
        rows.append(
            {
                "sampler": sampler,
                "same_s": round(statistics.median(same), 4),
                "after_switch_s": round(statistics.median(switched), 4),
                "switch_cost_s": round(statistics.median(switched) - statistics.median(same), 4),
            }
        )
    report = {
        "gpu": torch.cuda.get_device_name(),
        "steps": args.steps,
        "repeats": args.repeats,
        "unique_graphs_before": graphs,
        "unique_graphs_after": counters["stats"]["unique_graphs"],
        "recompiles": dict(counters["recompiles"]),
        "samplers": rows,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
