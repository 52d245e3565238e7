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
    """Template the user's words and fit them into MAX_CHUNKS CLIP chunks.

    When too long, whole words are cut from the end of the user's words (never from the template), so the
    caller gets back exactly the words that were dropped, as typed.
    """
    words = description.split()
    budget = MAX_CHUNKS * CHUNK_TOKENS - len(_ids(tokenizer, PROMPT_PREFIX + PROMPT_SUFFIX))
    kept = len(words)
    if len(_ids(tokenizer, " ".join(words))) > budget:
        low, high = 0, len(words) - 1  # the longest prefix of words that fits: binary search
        while low < high:
            middle = (low + high + 1) // 2
            fits = len(_ids(tokenizer, " ".join(words[:middle]))) <= budget
            low, high = (middle, high) if fits else (low, middle - 1)
        kept = low
    text = build_prompt(" ".join(words[:kept]))
    return PromptTokens(text=text, token_ids=tuple(_ids(tokenizer, text)), dropped_words=" ".join(words[kept:]))


def tokenize_negative(tokenizer: PreTrainedTokenizerBase, extra: str | None = None) -> PromptTokens:
    """The fixed negative prompt (against the known failures), followed by the caller's own words if any: they add
    to it, never replace it. Words beyond MAX_CHUNKS chunks are cut from the caller's end."""
    fixed = _ids(tokenizer, NEGATIVE_PROMPT)[:CHUNK_TOKENS]
    words = " ".join((extra or "").split())
    if not words:
        return PromptTokens(text=NEGATIVE_PROMPT, token_ids=tuple(fixed), dropped_words="")
    text = f"{NEGATIVE_PROMPT}, {words}"
    ids = _ids(tokenizer, text)[: MAX_CHUNKS * CHUNK_TOKENS]
    return PromptTokens(text=text, token_ids=tuple(ids), dropped_words="")


def chunk_input_ids(tokenizer: PreTrainedTokenizerBase, token_ids: tuple[int, ...], chunks: int) -> list[list[int]]:
    """Split into `chunks` rows of [BOS] + 75 tokens + [EOS], padded the way SD1.5's tokenizer pads."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = []
    for index in range(chunks):
        part = list(token_ids[index * CHUNK_TOKENS : (index + 1) * CHUNK_TOKENS])
        row = [bos] + part + [eos]
        rows.append(row + [pad] * (CHUNK_TOKENS + 2 - len(row)))
    return rows
