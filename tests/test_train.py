"""train/run.py's text phase on the CPU: a few seconds of attribute pretraining must make the text encoder tell
prompts apart that differ in one attribute, which diffusion training alone did not (the H200 run of 2026-12-02:
"blue" vs "red background" 0.8% apart, the UNet had nothing to condition on)."""

import time

import torch
from transformers import CLIPTokenizer

from service.config import SD15_CONFIG_DIR
from service.prompts import build_prompt
from train import model, sprites
from train.run import Config, Log, make_data, prompt_separation, tokenize, train_text

STEPS = 120


def test_captions_name_the_attributes_their_labels_say():
    _, captions, labels = make_data(64, seed=0)
    background = list(sprites.ATTRIBUTES).index("background")
    for (full, short), (full_labels, short_labels) in zip(captions, labels.tolist(), strict=True):
        assert short.startswith(build_prompt("")[:20])
        assert -1 not in (full_labels[background],)  # the full format names everything
        for text, label in ((full, full_labels[background]), (short, short_labels[background])):
            colour = sprites.ATTRIBUTES["background"][label] if label >= 0 else None
            assert (f"{colour} background" in text) if colour else (" background" not in text)


def test_text_phase_makes_the_encoder_separate_prompts_that_differ_in_one_attribute():
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(SD15_CONFIG_DIR / "tokenizer")
    untrained = prompt_separation(model.text_encoder().eval(), tokenizer, "cpu")
    cfg = Config(sprites=512, text_batch=64, max_steps=STEPS, held_out=128)
    _, text, labels = make_data(cfg.sprites, seed=0)
    _, held_text, held_labels = make_data(cfg.held_out, seed=1)
    log = Log()
    start = time.time()
    train_text(
        tokenize(text, tokenizer), labels, (tokenize(held_text, tokenizer), held_labels), cfg, 0, log, "cpu", None
    )
    result = log.phases["text"]
    print(f"\n{STEPS} steps in {time.time() - start:.1f} s: untrained {untrained}, trained {result['separation']}")
    print(f"held-out accuracy {result['held_out_accuracy']}")
    assert result["separation"]["background"] > 3 * untrained["background"]
    assert result["separation"]["background"] > 0.2
    assert result["held_out_accuracy"]["mean"] > 0.5
