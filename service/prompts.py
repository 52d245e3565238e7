"""The fixed prompt template in the caption format the LoRA was trained on, and CLIP token budgeting.

CLIP reads 77 tokens (75 plus BOS/EOS). Long prompts are encoded in chunks of 75 tokens, as kohya's
trainer does with max_token_length=225, so the user's words are kept up to MAX_CHUNKS chunks; anything
beyond is cut from the user's words (never from the template) and reported back to the caller.
"""

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

PROMPT_PREFIX = "pixel art, 24x24, portrait of bespoke punk "
PROMPT_SUFFIX = ", sharp pixel edges, hard color borders, retro pixel art style"
NEGATIVE_PROMPT = (
    "photograph, photo, realistic, photorealistic, 3d render, soft gradients, gradient, blur, blurry, "
    "noise, noisy, random pixels, jpeg artifacts, dithering, anti-aliasing, text, watermark"
)
CHUNK_TOKENS = 75
MAX_CHUNKS = 3


@dataclass(frozen=True)
class PromptTokens:
    text: str  # the final prompt, as encoded (after any cut)
    token_ids: tuple[int, ...]  # without BOS/EOS
    dropped_words: str  # the end of the user's words that did not fit; "" when nothing was cut

    @property
    def chunk_count(self) -> int:
        return max(1, -(-len(self.token_ids) // CHUNK_TOKENS))


def build_prompt(description: str) -> str:
    return PROMPT_PREFIX + description.strip() + PROMPT_SUFFIX


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]


def tokenize_prompt(tokenizer: PreTrainedTokenizerBase, description: str) -> PromptTokens:
    """Template the user's words and fit them into MAX_CHUNKS CLIP chunks, cutting only the user's words."""
    prefix, words, suffix = (_ids(tokenizer, part) for part in (PROMPT_PREFIX, description.strip(), PROMPT_SUFFIX))
    budget = MAX_CHUNKS * CHUNK_TOKENS - len(prefix) - len(suffix)
    kept, dropped = words[:budget], words[budget:]
    kept_text = tokenizer.decode(kept).strip()
    return PromptTokens(
        text=build_prompt(kept_text) if dropped else build_prompt(description),
        token_ids=tuple(prefix + kept + suffix),
        dropped_words=tokenizer.decode(dropped).strip(),
    )


def tokenize_negative(tokenizer: PreTrainedTokenizerBase) -> PromptTokens:
    ids = _ids(tokenizer, NEGATIVE_PROMPT)[:CHUNK_TOKENS]
    return PromptTokens(text=NEGATIVE_PROMPT, token_ids=tuple(ids), dropped_words="")


def chunk_input_ids(tokenizer: PreTrainedTokenizerBase, token_ids: tuple[int, ...], chunks: int) -> list[list[int]]:
    """Split into `chunks` rows of [BOS] + 75 tokens + [EOS], padded the way SD1.5's tokenizer pads."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = []
    for index in range(chunks):
        part = list(token_ids[index * CHUNK_TOKENS : (index + 1) * CHUNK_TOKENS])
        row = [bos] + part + [eos]
        rows.append(row + [pad] * (CHUNK_TOKENS + 2 - len(row)))
    return rows
