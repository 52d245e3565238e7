"""The shipped CLIP tokenizer files must be SD1.5's real vocabulary, derived from open_clip's BPE file."""

import json

from transformers import CLIPTokenizer

from service.config import SD15_CONFIG_DIR
from tests.clip_vocabulary import derive_clip_vocabulary

TOKENIZER_DIR = SD15_CONFIG_DIR / "tokenizer"


def test_shipped_vocabulary_is_derived_from_open_clip_bpe():
    vocab, merges = derive_clip_vocabulary()
    assert json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8")) == vocab
    assert (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()[1:] == merges


def test_tokenizer_has_49408_entries_and_known_ids():
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    assert len(tokenizer) == 49408
    ids = tokenizer("pixel art").input_ids
    assert ids[0] == tokenizer.bos_token_id == 49406
    assert ids[-1] == tokenizer.eos_token_id == 49407
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["pixel</w>", "art</w>"]
    assert tokenizer.model_max_length == 77
