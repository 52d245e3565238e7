"""`punks train DATA` and Cog's `train`: read and check the data (before any model loads), train one checkpoint
per epoch, rank every epoch with `lora evaluate` (fixed prompts and seeds, the snapper's verdict), and keep the
best one. What lands in the output folder:

    <name>.safetensors         the best epoch: what PUNKS_LORA and Cog's lora_weights take
    evaluation/                contact_sheet.png, ranking.md, ranking.json, sprites/ (lora evaluate's outputs)
    captions/<image>.txt       the captions trained on (written ones included)
    checkpoints/               <name>-<epoch>.safetensors and state.pt: a stopped run resumes from here
    training.json              recipe, data, per-epoch loss and time, the chosen epoch
"""

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from service.config import MAX_SEED, MAX_STEPS, MIN_STEPS, Settings
from service.lora import evaluate as lora_evaluate
from service.training.captions import check_subject
from service.training.data import Example, read_dataset
from service.training.recipe import Recipe, check_base_model

log = logging.getLogger(__name__)

DEFAULT_SUBJECT = "lad"  # the word after "bespoke punk" in the seed's captions (lad, lass)
DEFAULT_EVAL_STEPS = 25


@dataclass(frozen=True)
class Evaluation:
    prompts: Path = lora_evaluate.PROMPTS_FILE
    seeds: tuple[int, ...] = lora_evaluate.DEFAULT_SEEDS
    steps: int = DEFAULT_EVAL_STEPS


@dataclass(frozen=True)
class TrainingResult:
    lora: Path  # the best epoch's file
    best_epoch: int
    contact_sheet: Path
    ranking: Path  # ranking.md
    captions: Path  # folder
    summary: Path  # training.json


def prepare(data: Path, base_model: Path, recipe: Recipe, subject: str) -> list[Example]:
    """Every check that needs no model: settings, base model, data. Raises ValueError naming what is wrong."""
    recipe.check()
    subject = check_subject(subject)
    check_base_model(base_model, recipe.force)
    examples = read_dataset(data, subject)
    written = sum(e.caption_written for e in examples)
    log.info(
        "data: %d portraits, %d captions given, %d written from the sprites",
        len(examples),
        len(examples) - written,
        written,
    )
    return examples


def train(
    data: Path,
    out: Path,
    base_model: Path,
    recipe: Recipe | None = None,
    subject: str = DEFAULT_SUBJECT,
    name: str = "bespoke_punks",
    evaluation: Evaluation | None = None,
    resume: bool = True,
) -> TrainingResult:
    from service.training.loop import EpochLog, train_lora  # torch: imported once the data has passed

    recipe, evaluation = recipe or Recipe(), evaluation or Evaluation()
    examples = prepare(data, base_model, recipe, subject)
    prompts = lora_evaluate.load_prompts(evaluation.prompts)
    if bad := [seed for seed in evaluation.seeds if not 0 <= seed <= MAX_SEED]:
        raise ValueError(f"eval_seeds: {bad[0]} is not between 0 and {MAX_SEED}")
    if not MIN_STEPS <= evaluation.steps <= MAX_STEPS:
        raise ValueError(f"eval_steps: must be between {MIN_STEPS} and {MAX_STEPS}, got {evaluation.steps}")
    settings = Settings(base_model=base_model, warmup=False, steps=evaluation.steps)
    out.mkdir(parents=True, exist_ok=True)
    captions = save_captions(examples, out / "captions")
    started = time.monotonic()
    epochs: list[EpochLog] = []
    checkpoints = train_lora(
        base_model, examples, recipe, out / "checkpoints", name, settings.torch_device, resume, epochs.append
    )
    training_s = time.monotonic() - started
    ranked = rank_epochs(checkpoints, settings, prompts, list(evaluation.seeds), evaluation.steps, out / "evaluation")
    best = ranked[0]
    best_epoch = int(best["name"].rsplit("-", 1)[1])
    lora = out / f"{name}.safetensors"
    shutil.copyfile(best["file"], lora)
    summary = out / "training.json"
    summary.write_text(
        json.dumps(
            {
                "base_model": str(base_model),
                "recipe": asdict(recipe),
                "subject": subject,
                "images": len(examples),
                "captions_written": sum(e.caption_written for e in examples),
                "epochs": [asdict(e) for e in epochs],
                "training_s": round(training_s, 1),
                "evaluation": {"prompts": prompts, "seeds": list(evaluation.seeds), "steps": evaluation.steps},
                "ranking": ranked,
                "best_epoch": best_epoch,
                "lora": lora.name,
            },
            indent=2,
        )
        + "\n"
    )
    log.info("best epoch %d of %d (score %.3f): %s", best_epoch, recipe.epochs, best["score"], lora)
    evaluated = out / "evaluation"
    return TrainingResult(
        lora, best_epoch, evaluated / "contact_sheet.png", evaluated / "ranking.md", captions, summary
    )


def rank_epochs(
    checkpoints: list[Path], settings: Settings, prompts: list[str], seeds: list[int], steps: int, out: Path
) -> list[dict]:
    """`lora evaluate` over the epochs' checkpoints: contact sheet, ranking.md/json and sprites in `out`; the
    ranking rows, best first."""
    import gc

    import torch

    from service.engine import Engine

    gc.collect()  # the training's pipeline and optimizer, before a second pipeline loads
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    named = lora_evaluate.checkpoint_names(checkpoints)
    engine = Engine.load(settings.model_copy(update={"lora": checkpoints[-1]}), loras=named)
    try:
        out.mkdir(parents=True, exist_ok=True)
        results = lora_evaluate.evaluate(engine, named, prompts, seeds, steps, out, show_progress=False)
        lora_evaluate.write_outputs(results, prompts, seeds, steps, out, smoke=False)
    finally:
        engine.close()
    rows = lora_evaluate.ranking(results)
    log.info("epochs ranked by lora evaluate:\n%s", lora_evaluate.ranking_markdown(rows))
    return rows


def save_captions(examples: list[Example], folder: Path) -> Path:
    for example in examples:
        path = folder / f"{example.name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(example.caption + "\n")
    return folder


# --- command line ------------------------------------------------------------------------------------


def add_command(commands) -> None:
    defaults = Recipe()
    parser = commands.add_parser(
        "train", help="train a LoRA on a folder or .zip of pixel-art portraits; every epoch ranked, the best kept"
    )
    parser.add_argument(
        "data", type=Path, help="folder or .zip of 24x24 sprites (or larger pixel art), optional .txt captions"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("out/train"), help="output folder (default out/train); resumes a stopped run"
    )
    parser.add_argument(
        "--base-model", type=Path, help="SD1.5 folder or .safetensors (default: the deployment's, PUNKS_BASE_MODEL)"
    )
    parser.add_argument(
        "--subject",
        default=DEFAULT_SUBJECT,
        help=f"word after 'bespoke punk' in written captions (default {DEFAULT_SUBJECT})",
    )
    parser.add_argument("--name", default="bespoke_punks", help="file name of the LoRA (default bespoke_punks)")
    parser.add_argument(
        "--rank",
        type=int,
        default=defaults.rank,
        help=f"network dim (default {defaults.rank}; 64 or more needs --force)",
    )
    parser.add_argument(
        "--alpha", type=float, default=defaults.alpha, help=f"network alpha (default {defaults.alpha:g})"
    )
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help=f"default {defaults.epochs}")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help=f"default {defaults.batch_size}")
    parser.add_argument(
        "--learning-rate", type=float, default=defaults.learning_rate, help=f"UNet (default {defaults.learning_rate:g})"
    )
    parser.add_argument(
        "--text-encoder-learning-rate",
        type=float,
        default=defaults.text_encoder_learning_rate,
        help=f"default {defaults.text_encoder_learning_rate:g}",
    )
    parser.add_argument(
        "--resolution", type=int, default=defaults.resolution, help=f"px (default {defaults.resolution})"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--force", action="store_true", help="train what the seed's runs refute (rank >= 64, an SD2 base)"
    )
    parser.add_argument(
        "--eval-prompts", type=Path, default=lora_evaluate.PROMPTS_FILE, help="one description per line"
    )
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=list(lora_evaluate.DEFAULT_SEEDS))
    parser.add_argument("--eval-steps", type=int, default=DEFAULT_EVAL_STEPS, help=f"default {DEFAULT_EVAL_STEPS}")
    parser.add_argument("--no-resume", action="store_true", help="start over even if --out holds a stopped run")
    parser.set_defaults(run=run)


def run(args) -> int:
    from service.weights.resolve import resolve_weights

    recipe = Recipe(
        rank=args.rank,
        alpha=args.alpha,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        text_encoder_learning_rate=args.text_encoder_learning_rate,
        resolution=args.resolution,
        seed=args.seed,
        force=args.force,
    )
    base = args.base_model or resolve_weights(Settings()).base_model
    evaluation = Evaluation(args.eval_prompts, tuple(args.eval_seeds), args.eval_steps)
    result = train(args.data, args.out, base, recipe, args.subject, args.name, evaluation, resume=not args.no_resume)
    print(f"best epoch {result.best_epoch}: {result.lora}")
    for path in (result.contact_sheet, result.ranking, result.captions, result.summary):
        print(path)
    return 0
