"""What a weight file is, read without loading it: its SHA-256, its size for people, and a safetensors file's
tensor table (names, shapes, dtypes, metadata).

The table comes from `safetensors.safe_open`, which also refuses a file whose tensors do not fill it exactly
(a download cut short, or padded): that is the one truncation check of `weights check`, `lora inspect` and
start-up. Only the header is read (the file is memory-mapped), so a 2 GB checkpoint is inspected in
milliseconds, and no torch is imported. The one thing safe_open cannot do without torch is return a bfloat16
value (numpy has no such dtype); `read_scalars` reads those two bytes itself.
"""

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

HEADER_LENGTH_BYTES = 8  # a safetensors file starts with its JSON header's length (little-endian u64)
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
# safetensors' reasons for refusing a header -> what the message says (the first match wins).
HEADER_PROBLEMS = (
    ("header too small", "not a safetensors file (too short)"),
    ("header too large", "not a safetensors file (bad header length)"),
    ("invalid header length", "not a safetensors file (bad header length)"),
    ("file not fully covered", "truncated or padded file: its tensors do not fill it exactly"),
    ("invalid shape, data type, or offset", "not a safetensors file (malformed header)"),
    # serde's data errors: valid JSON of the wrong shape
    *(
        (f"invalid JSON in header: {kind}", "not a safetensors file (malformed header)")
        for kind in (
            "invalid type",
            "invalid value",
            "invalid length",
            "unknown variant",
            "unknown field",
            "missing field",
            "duplicate field",
        )
    ),
    ("invalid JSON in header", "not a safetensors file (unreadable header)"),
)


class WeightFileError(ValueError):
    """The file is not a complete safetensors file; the message says why (without the path)."""


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F16, BF16, F32, ...

    @property
    def values(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class TensorTable:
    """A safetensors file's header: every tensor's shape and dtype, the metadata, and the bytes of tensor data."""

    tensors: dict[str, TensorSpec]
    metadata: dict[str, str]
    data_bytes: int

    @property
    def dtypes(self) -> frozenset[str]:
        return frozenset(spec.dtype for spec in self.tensors.values())


def sha256_of(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def format_size(n: float) -> str:
    """Bytes for people, in binary units: 512 B, 36.0 MiB, 1.6 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def read_tensor_table(path: Path) -> TensorTable:
    """The header of a safetensors file, after safetensors checked it describes the whole file."""
    try:
        with safe_open(str(path), framework="np") as handle:
            tensors = {}
            names = handle.keys()  # a safe_open handle is no mapping: keys() is its listing
            for name in names:
                view = handle.get_slice(name)
                tensors[name] = TensorSpec(tuple(view.get_shape()), view.get_dtype())
            metadata = handle.metadata() or {}
    except SafetensorError as error:
        raise WeightFileError(_header_problem(str(error))) from None
    with path.open("rb") as handle:
        header_bytes = int.from_bytes(handle.read(HEADER_LENGTH_BYTES), "little")
    data_bytes = path.stat().st_size - HEADER_LENGTH_BYTES - header_bytes
    return TensorTable(tensors=tensors, metadata=metadata, data_bytes=data_bytes)


def read_scalars(path: Path, table: TensorTable, names: Iterable[str]) -> dict[str, float]:
    """The values of single-value float tensors (kohya's per-module alpha), reading only their own bytes."""
    names = list(names)
    for name in names:
        spec = table.tensors[name]
        if spec.dtype not in FLOAT_DTYPES or spec.values != 1:
            raise WeightFileError(f"{name} is a {spec.dtype} tensor of shape {list(spec.shape)}, expected one float")
    bfloat16 = [name for name in names if table.tensors[name].dtype == "BF16"]
    with safe_open(str(path), framework="np") as handle:
        values = {name: float(handle.get_tensor(name).reshape(-1)[0]) for name in names if name not in bfloat16}
    return values | (_bfloat16_scalars(path, bfloat16) if bfloat16 else {})


def _bfloat16_scalars(path: Path, names: list[str]) -> dict[str, float]:
    """bfloat16 is the top half of a float32. The offsets come from the header safe_open has already validated."""
    values = {}
    with path.open("rb") as handle:
        header_bytes = int.from_bytes(handle.read(HEADER_LENGTH_BYTES), "little")
        header = json.loads(handle.read(header_bytes))
        for name in names:
            handle.seek(HEADER_LENGTH_BYTES + header_bytes + header[name]["data_offsets"][0])
            values[name] = float(np.frombuffer(b"\x00\x00" + handle.read(2), "<f4")[0])
    return values


def _header_problem(message: str) -> str:
    detail = message.removeprefix("Error while deserializing header: ")
    reason = next((reason for phrase, reason in HEADER_PROBLEMS if phrase in message), "not a safetensors file")
    return reason if reason.startswith("truncated") else f"{reason}: {detail}"
