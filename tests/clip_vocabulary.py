"""Derive the SD1.5 CLIP tokenizer files (vocab.json, merges.txt) from the BPE file inside open_clip_torch.

The Hugging Face tokenizer files that ship in service/sd15_config/tokenizer are this derivation written out
(vocab.json: the vocab as JSON; merges.txt: "#version: 0.2" then the merges); tests compare them with a fresh
derivation so that nobody can replace them with a wrong vocabulary.
It follows OpenAI CLIP's SimpleTokenizer, which builds the same 49,408-entry vocabulary.
"""

import gzip
import importlib.util
from pathlib import Path

MERGE_COUNT = 49152 - 256 - 2


def open_clip_bpe_path() -> Path:
    """Locate the BPE file without importing open_clip (its import needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise RuntimeError("open_clip_torch is not installed: pip install --no-deps open_clip_torch")
    return Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> dict[int, str]:
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def derive_clip_vocabulary() -> tuple[dict[str, int], list[str]]:
    """Return (vocab, merges) exactly as SD1.5's tokenizer folder holds them."""
    with gzip.open(open_clip_bpe_path()) as bpe:
        lines = bpe.read().decode("utf-8").split("\n")
    merges = lines[1 : MERGE_COUNT + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges
