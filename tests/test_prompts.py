from transformers import CLIPTokenizer

from service.config import SD15_CONFIG_DIR
from service.prompts import (
    CHUNK_TOKENS,
    MAX_CHUNKS,
    PROMPT_PREFIX,
    PROMPT_SUFFIX,
    build_prompt,
    chunk_input_ids,
    tokenize_negative,
    tokenize_prompt,
)

TOKENIZER = CLIPTokenizer.from_pretrained(SD15_CONFIG_DIR / "tokenizer")


def test_template_follows_the_trained_caption_format():
    prompt = build_prompt("  lad with a red beanie, green background ")
    assert prompt.startswith("pixel art, 24x24, portrait of bespoke punk lad with a red beanie, green background,")
    assert prompt.endswith("sharp pixel edges, hard color borders, retro pixel art style")


def test_short_prompt_fits_one_chunk_and_matches_plain_clip_tokenization():
    tokens = tokenize_prompt(TOKENIZER, "lad with a red beanie, green background")
    assert tokens.dropped_words == ""
    assert tokens.chunk_count == 1
    plain = TOKENIZER(tokens.text, padding="max_length", max_length=77).input_ids
    assert chunk_input_ids(TOKENIZER, tokens.token_ids, 1) == [plain]


def test_long_prompt_uses_more_chunks_without_losing_words():
    words = ", ".join(f"detail number {i}" for i in range(20))  # ~80 tokens: more than one chunk
    tokens = tokenize_prompt(TOKENIZER, words)
    assert tokens.dropped_words == ""
    assert 1 < tokens.chunk_count <= MAX_CHUNKS
    assert len(tokens.token_ids) > CHUNK_TOKENS
    assert tokens.text == build_prompt(words)
    rows = chunk_input_ids(TOKENIZER, tokens.token_ids, tokens.chunk_count)
    assert all(len(row) == CHUNK_TOKENS + 2 and row[0] == TOKENIZER.bos_token_id for row in rows)
    assert [t for row in rows for t in row[1:-1] if t != TOKENIZER.pad_token_id] == list(tokens.token_ids)


def test_too_long_prompt_cuts_only_the_users_words_and_reports_them():
    words = " ".join(f"word{i}" for i in range(400))
    tokens = tokenize_prompt(TOKENIZER, words)
    assert len(tokens.token_ids) <= MAX_CHUNKS * CHUNK_TOKENS
    assert tokens.text.startswith(PROMPT_PREFIX) and tokens.text.endswith(PROMPT_SUFFIX)
    kept = tokens.text.removeprefix(PROMPT_PREFIX).removesuffix(PROMPT_SUFFIX)
    assert kept + " " + tokens.dropped_words == words  # nothing lost silently: kept + dropped is the input
    assert tokens.dropped_words.endswith("word399") and "word0 " in kept
    longer = tokenize_prompt(TOKENIZER, words + " x")  # one more word would not have fitted
    assert len(longer.token_ids) <= MAX_CHUNKS * CHUNK_TOKENS


def test_negative_prompt_fits_one_chunk_and_names_the_failure_modes():
    negative = tokenize_negative(TOKENIZER)
    assert negative.chunk_count == 1
    for failure in ("photograph", "realistic", "soft gradients", "blur", "noise", "random pixels"):
        assert failure in negative.text
