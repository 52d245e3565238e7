"""`python -m service lora inspect|diff`: what a LoRA file is and how it was trained, from its header alone.

Every value comes from the file: the tensors' names and shapes, or the `ss_*` metadata kohya's sd-scripts
writes. What the file does not say is reported as "unknown", never guessed.
"""

import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from service.lora.inspect import FAMILY_NAMES, LoraInfo, inspect_lora
from service.lora.layout import SD15_DIM, sd15_lora_bytes, sd15_modules
from service.weights.files import format_size

UNKNOWN = "unknown"
TARGET_NAMES = {"unet": "UNet", "te": "text encoder", "te1": "text encoder 1", "te2": "text encoder 2"}
BYTES_PER_VALUE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
TOP_TAGS = 10

# (label, metadata keys tried in order); values are shown exactly as stored.
TRAINING_FIELDS = (
    ("output name", ("ss_output_name",)),
    ("session id", ("ss_session_id",)),
    ("epoch", ("ss_epoch",)),
    ("epochs planned", ("ss_num_epochs",)),
    ("steps", ("ss_steps",)),
    ("max train steps", ("ss_max_train_steps",)),
    ("learning rate", ("ss_learning_rate",)),
    ("unet lr", ("ss_unet_lr",)),
    ("text encoder lr", ("ss_text_encoder_lr",)),
    ("lr scheduler", ("ss_lr_scheduler",)),
    ("optimizer", ("ss_optimizer",)),
    ("network module", ("ss_network_module",)),
    ("network dim (metadata)", ("ss_network_dim",)),
    ("network alpha (metadata)", ("ss_network_alpha",)),
    ("network args", ("ss_network_args",)),
    ("base model version", ("ss_base_model_version", "modelspec.architecture")),
    ("base model name", ("ss_sd_model_name",)),
    ("base model hash", ("ss_new_sd_model_hash", "ss_sd_model_hash")),
    ("LoRA hash (sshs_model_hash)", ("sshs_model_hash",)),
    ("batch size", ("ss_total_batch_size", "ss_batch_size_per_device")),
    ("train images (with repeats)", ("ss_num_train_images",)),
    ("mixed precision", ("ss_mixed_precision",)),
    ("seed", ("ss_seed",)),
    ("clip skip", ("ss_clip_skip",)),
    ("noise offset", ("ss_noise_offset",)),
    ("training comment", ("ss_training_comment",)),
    ("sd-scripts commit", ("ss_sd_scripts_commit_hash",)),
)


def report(info: LoraInfo) -> dict:
    """Everything `lora inspect` shows, JSON-ready."""
    modules = list(info.modules.values())
    meta = info.metadata
    weight_dtypes = sorted({m.dtype for m in modules if m.dtype})
    return {
        "file": str(info.path),
        "format": info.format,
        "base_model": {
            "family": FAMILY_NAMES[info.family],
            "from_keys": FAMILY_NAMES[info.family_from_keys],
            "from_metadata": FAMILY_NAMES[info.family_from_metadata],
            "agree": _agree(info.family_from_keys, info.family_from_metadata),
        },
        "rank": _spread(m.rank for m in modules),
        "alpha": _spread(m.alpha for m in modules),
        "scale": _spread(None if m.scale is None else round(m.scale, 6) for m in modules),
        "modules": {"total": len(modules), **info.module_counts},
        "conv_modules": info.conv_modules,
        "dtypes": weight_dtypes,
        "file_size": info.file_size,
        "tensor_bytes": info.tensor_bytes,
        "expected": _expected(info, weight_dtypes),
        "training": {label: _first(meta, keys) for label, keys in TRAINING_FIELDS}
        | {
            "resolution": _resolution(meta),
            "training started": _time(meta, "ss_training_started_at"),
            "training finished": _time(meta, "ss_training_finished_at"),
        },
        "dataset": {"dirs": _dataset_dirs(meta), "images": _image_count(meta), "tag_frequency": _tag_summary(meta)},
        "metadata_keys": len(meta),
    }


def captions_key(meta: dict) -> tuple | None:
    """What the captions were, comparable across runs: every tag and how often it appeared, summed over the
    dataset folders (the same captions copied to another folder name stay 'the same')."""
    frequency = _json(meta.get("ss_tag_frequency"))
    if not isinstance(frequency, dict) or not frequency:
        return None
    total: Counter[str] = Counter()
    for tags in frequency.values():
        if isinstance(tags, dict):
            total.update({str(tag).strip(): int(count) for tag, count in tags.items()})
    return tuple(sorted(total.items())) or None


def compare(values: list) -> str:
    """'same' when every file knows the value and they agree, 'different' when two known values differ,
    else 'unknown'."""
    known = [v for v in values if v is not None]
    if len(known) >= 2 and any(v != known[0] for v in known):
        return "different"
    return "same" if len(known) == len(values) else UNKNOWN


# --- inspect ---------------------------------------------------------------------------------------


def format_report(data: dict) -> str:
    rows = [
        ("file", data["file"]),
        ("format", data["format"]),
        ("base model", _family_line(data["base_model"])),
        ("rank", _spread_line(data["rank"])),
        ("alpha", _spread_line(data["alpha"])),
        ("scale (alpha/rank)", _spread_line(data["scale"])),
        ("modules", _modules_line(data["modules"])),
        (
            "conv (LoCon) modules",
            str(len(data["conv_modules"])) + (f" (e.g. {data['conv_modules'][0]})" if data["conv_modules"] else ""),
        ),
        ("dtype", ", ".join(data["dtypes"]) or UNKNOWN),
        ("file size", format_size(data["file_size"])),
        (f"expected (dim {SD15_DIM} SD1.5)", _expected_line(data["expected"])),
        *((label, value) for label, value in data["training"].items()),
        ("dataset dirs", _dirs_line(data["dataset"]["dirs"])),
        ("images (folders)", _str(data["dataset"]["images"])),
        ("tag frequency", _tags_line(data["dataset"]["tag_frequency"])),
        ("metadata keys", str(data["metadata_keys"])),
    ]
    return _table([("", "")] + rows, header=False, max_width=160)


def inspect_command(path: Path, as_json: bool) -> str:
    data = report(inspect_lora(path))
    return json.dumps(data, indent=2) if as_json else format_report(data)


# --- diff ------------------------------------------------------------------------------------------


def diff(paths: list[Path], show_all: bool = False) -> dict:
    infos = [inspect_lora(p) for p in paths]
    reports = [report(info) for info in infos]
    rows = []
    for label, value in _diff_rows():
        values = [value(r) for r in reports]
        if show_all or len(set(values)) > 1:
            rows.append({"parameter": label, "values": values, "differs": len(set(values)) > 1})
    captions = [captions_key(info.metadata) for info in infos]
    dirs = [_dirs_key(r["dataset"]["dirs"]) for r in reports]
    images = [r["dataset"]["images"] for r in reports]
    return {
        "files": [str(p) for p in paths],
        "parameters": rows,
        "training_data": {
            "captions": compare(captions),
            "dataset_dirs": compare(dirs),
            "images": compare(images),
        },
    }


def format_diff(data: dict) -> str:
    names = [Path(f).name for f in data["files"]]
    lines = [
        _table([("parameter", *names)] + [(row["parameter"], *map(_str, row["values"])) for row in data["parameters"]])
    ]
    if not data["parameters"]:
        lines.append("(no parameter differs)")
    td = data["training_data"]
    lines += [
        "",
        f"captions (ss_tag_frequency): {td['captions']}",
        f"dataset dirs (ss_dataset_dirs): {td['dataset_dirs']}",
        f"number of images: {td['images']}",
        "summary: " + _summary(data),
    ]
    return "\n".join(lines)


def diff_command(paths: list[Path], as_json: bool, show_all: bool) -> str:
    data = diff(paths, show_all)
    return json.dumps(data, indent=2) if as_json else format_diff(data)


def _diff_rows():
    def training(label):
        return lambda r: r["training"][label]

    return [
        ("base model", lambda r: r["base_model"]["family"]),
        ("format", lambda r: r["format"]),
        ("rank", lambda r: _spread_line(r["rank"])),
        ("alpha", lambda r: _spread_line(r["alpha"])),
        ("scale", lambda r: _spread_line(r["scale"])),
        ("modules", lambda r: _modules_line(r["modules"])),
        ("conv modules", lambda r: len(r["conv_modules"])),
        ("dtype", lambda r: ", ".join(r["dtypes"])),
        ("file size", lambda r: format_size(r["file_size"])),
        ("resolution", training("resolution")),
        *((label, training(label)) for label, _ in TRAINING_FIELDS),
        ("training started", training("training started")),
        ("images (folders)", lambda r: r["dataset"]["images"]),
    ]


def _summary(data: dict) -> str:
    parts = [f"{data['training_data']['captions']} captions"]
    rows = {row["parameter"]: row["values"] for row in data["parameters"] if row["differs"]}
    if "rank" in rows:
        parts.append("dim " + " vs ".join(map(_str, rows["rank"])))
    if "base model" in rows:
        parts.append(" vs ".join(map(_str, rows["base model"])))
    return ", ".join(parts)


# --- helpers ---------------------------------------------------------------------------------------


def _spread(values) -> dict:
    """{"values": {value: modules}, "varies": bool}; modules without the value count under "unknown"."""
    counts = Counter(UNKNOWN if v is None else v for v in values)
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
    return {"values": {_key(v): n for v, n in ordered}, "varies": len(counts) > 1}


def _key(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _spread_line(spread: dict) -> str:
    values = spread["values"]
    if len(values) == 1:
        return next(iter(values))
    return "varies: " + ", ".join(f"{v} x{n}" for v, n in values.items())


def _agree(from_keys: str, from_metadata: str) -> bool | None:
    return None if UNKNOWN in (from_keys, from_metadata) else from_keys == from_metadata


def _family_line(base: dict) -> str:
    note = {True: "keys and metadata agree", False: "MISMATCH with metadata", None: "metadata: unknown"}[base["agree"]]
    if base["agree"] is False:
        note = f"keys say {base['from_keys']}, metadata says {base['from_metadata']}: MISMATCH"
    elif base["from_keys"] == UNKNOWN and base["from_metadata"] != UNKNOWN:
        note = "from metadata only (shapes can't tell)"
    return f"{base['family']} ({note})"


def _modules_line(modules: dict) -> str:
    parts = [f"{TARGET_NAMES.get(k, k)} {n}" for k, n in modules.items() if k != "total"]
    return f"{modules['total']} ({', '.join(parts)})"


def _expected(info: LoraInfo, weight_dtypes: list[str]) -> dict:
    """The size of a full dim-32 SD1.5 kohya LoRA in this file's dtype, and which SD1.5 modules the file covers."""
    width = BYTES_PER_VALUE.get(weight_dtypes[0], 2) if len(weight_dtypes) == 1 else 2
    full = sd15_modules()
    expected = {
        "bytes": sd15_lora_bytes(SD15_DIM, width),
        "modules": len(full),
        "unet": sum(n.startswith("lora_unet_") for n in full),
        "te": sum(n.startswith("lora_te_") for n in full),
        "dtype": weight_dtypes[0] if len(weight_dtypes) == 1 else "F16",
        "ratio": round(info.tensor_bytes / sd15_lora_bytes(SD15_DIM, width), 3),
    }
    if info.format == "kohya" and info.family == "sd1":
        present = set(info.modules) & set(full)
        expected["covered"] = len(present)
        expected["missing"] = len(full) - len(present)
        expected["extra"] = len(set(info.modules) - set(full))
    return expected


def _expected_line(e: dict) -> str:
    line = (
        f"{format_size(e['bytes'])} of {e['dtype']} tensors for {e['modules']} modules "
        f"({e['unet']} UNet + {e['te']} TE); this file {e['ratio']:g}x"
    )
    if "covered" in e:
        line += f"; covers {e['covered']}/{e['modules']} SD1.5 modules"
        if e["extra"]:
            line += f", {e['extra']} others"
    return line


def _first(meta: dict, keys: tuple[str, ...]) -> str:
    return next((meta[k] for k in keys if meta.get(k) not in (None, "")), UNKNOWN)


def _json(text):
    try:
        return json.loads(text) if text else None
    except (TypeError, json.JSONDecodeError):
        return None


def _resolution(meta: dict) -> str:
    if meta.get("ss_resolution"):
        return meta["ss_resolution"]
    datasets = _json(meta.get("ss_datasets"))  # sd-scripts with a dataset config writes it per dataset
    if isinstance(datasets, list):
        found = sorted({str(tuple(d["resolution"])) for d in datasets if isinstance(d, dict) and d.get("resolution")})
        if found:
            return ", ".join(found)
    return UNKNOWN


def _time(meta: dict, key: str) -> str:
    try:
        return datetime.fromtimestamp(float(meta[key]), UTC).strftime("%Y-%m-%d %H:%M UTC")
    except (KeyError, ValueError, OverflowError, OSError):
        return UNKNOWN


def _dataset_dirs(meta: dict) -> dict | None:
    """{folder: {"img_count": n, "n_repeats": r}} from ss_dataset_dirs, or None when unknown."""
    dirs = _json(meta.get("ss_dataset_dirs"))
    return dirs if isinstance(dirs, dict) and dirs else None


def _dirs_key(dirs: dict | None) -> tuple | None:
    return None if dirs is None else tuple(sorted((name, json.dumps(v, sort_keys=True)) for name, v in dirs.items()))


def _image_count(meta: dict) -> int | None:
    """Distinct images: the folders' img_count summed (ss_num_train_images counts repeats)."""
    dirs = _dataset_dirs(meta)
    try:
        return sum(int(v["img_count"]) for v in dirs.values()) if dirs else None
    except (KeyError, TypeError, ValueError):
        return None


def _tag_summary(meta: dict) -> dict | None:
    key = captions_key(meta)
    if key is None:
        return None
    top = sorted(key, key=lambda kv: (-kv[1], kv[0]))[:TOP_TAGS]
    return {"distinct_tags": len(key), "total_tags": sum(n for _, n in key), "top": dict(top)}


def _dirs_line(dirs: dict | None) -> str:
    if not dirs:
        return UNKNOWN
    return ", ".join(
        f"{name} ({v.get('img_count', '?')} images x{v.get('n_repeats', '?')})" if isinstance(v, dict) else name
        for name, v in dirs.items()
    )


def _tags_line(tags: dict | None) -> str:
    if not tags:
        return UNKNOWN
    top = ", ".join(f"{tag} {n}" for tag, n in list(tags["top"].items())[:5])
    return f"{tags['distinct_tags']} distinct tags; top: {top}"


def _str(value) -> str:
    return UNKNOWN if value is None else str(value)


def _table(rows: list[tuple], header: bool = True, max_width: int = 70) -> str:
    cells = [[c if len(c := str(cell)) <= max_width else c[: max_width - 1] + "…" for cell in row] for row in rows]
    if not header:
        cells = cells[1:]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    if header:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --- command line ------------------------------------------------------------------------------------


def add_commands(commands) -> None:
    """`lora inspect FILE [--json]` and `lora diff A B [C ...] [--json] [--all]` under the main parser."""
    lora = commands.add_parser("lora", help="inspect and compare LoRA files (header only, no model loaded)")
    actions = lora.add_subparsers(dest="lora_command", required=True)
    inspect = actions.add_parser("inspect", help="base model, rank/alpha, modules, size and training metadata")
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(run=lambda args: _print(inspect_command(args.file, args.json)))
    compare_ = actions.add_parser("diff", help="side by side what differs between training runs")
    compare_.add_argument("files", type=Path, nargs="+", metavar="FILE")
    compare_.add_argument("--json", action="store_true", help="machine-readable output")
    compare_.add_argument("--all", action="store_true", help="show every parameter, not only those that differ")
    compare_.set_defaults(run=_run_diff)


def _run_diff(args) -> int:
    if len(args.files) < 2:
        raise ValueError("files: lora diff needs at least two files")
    return _print(diff_command(args.files, args.json, args.all))


def _print(text: str) -> int:
    print(text)
    return 0
