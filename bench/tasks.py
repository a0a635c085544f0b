"""The models and data the harness trains on, built the same way for every method.

    genre  all-MiniLM-L6-v2 (22.7M) + a new 3-way head, Shakespeare passages by genre (the demo's
           task: hift.demo.shakespeare), held-out accuracy on plays never trained on
    lm     a LLaMA-shaped model of about 56M parameters (hidden 512, 8 layers, 8 heads,
           intermediate 1376, vocab 30522 = the MiniLM WordPiece tokenizer's), random init,
           next-token loss on Shakespeare's plays cut into blocks of --seq tokens
    tiny   a 3-layer LLaMA of a few thousand parameters on random tokens (tests)
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

LM_SHAPE = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                intermediate_size=1376, vocab_size=30522)


@dataclass
class Task:
    name: str
    make_model: Callable[[], nn.Module]  # a fresh model, same weights every call
    batches: list  # training batches, cycled
    evaluate: Optional[Callable[[nn.Module], float]] = None  # held-out accuracy
    describe: dict = field(default_factory=dict)

    def tokens(self, batch) -> int:
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        if mask is not None:
            return int(mask.sum())
        return int(batch["input_ids"].numel())


def _quiet():
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def llama(vocab_size: int, hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
          intermediate_size: int, num_key_value_heads: Optional[int] = None, seed: int = 0,
          max_position_embeddings: int = 2048):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                         num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                         num_key_value_heads=num_key_value_heads or num_attention_heads,
                         max_position_embeddings=max_position_embeddings, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def tiny_task(batch: int = 2, seq: int = 12, steps: int = 4, seed: int = 0) -> Task:
    vocab = 67
    gen = torch.Generator().manual_seed(seed + 1)
    batches = []
    for _ in range(steps):
        ids = torch.randint(3, vocab, (batch, seq), generator=gen)
        batches.append({"input_ids": ids, "labels": ids.clone()})
    make = lambda: llama(vocab, 24, 3, 2, 40, num_key_value_heads=1, seed=seed, max_position_embeddings=64)
    return Task("tiny", make, batches, describe={"model": "3-layer LLaMA, hidden 24, vocab 67 (random)",
                                                  "data": "random tokens", "batch": batch, "seq": seq})


def _shakespeare_token_blocks(tokenizer, seq: int, count: int, seed: int) -> list[torch.Tensor]:
    from hift.demo.assets import shakespeare_texts
    from hift.demo.shakespeare import play_files, strip_front_matter, strip_gutenberg

    files = play_files(shakespeare_texts())
    stems = sorted(files)
    random.Random(seed).shuffle(stems)
    blocks: list[torch.Tensor] = []
    for stem in stems:
        text = strip_front_matter(strip_gutenberg(files[stem].read_text(encoding="utf-8", errors="replace")))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        blocks += [torch.tensor(ids[i:i + seq]) for i in range(0, len(ids) - seq + 1, seq)]
        if len(blocks) >= count * 4:
            break
    random.Random(seed).shuffle(blocks)
    return blocks[:count]


def minilm_tokenizer():
    from transformers import AutoTokenizer

    from hift.demo.assets import minilm_model

    _quiet()
    return AutoTokenizer.from_pretrained(minilm_model())


def lm_task(batch: int = 2, seq: int = 256, steps: int = 32, seed: int = 0, shape: Optional[dict] = None) -> Task:
    shape = dict(shape or LM_SHAPE)
    tokenizer = minilm_tokenizer()
    blocks = _shakespeare_token_blocks(tokenizer, seq, batch * steps, seed)
    batches = []
    for i in range(0, len(blocks) - batch + 1, batch):
        ids = torch.stack(blocks[i:i + batch])
        batches.append({"input_ids": ids, "labels": ids.clone()})
    make = lambda: llama(seed=seed, max_position_embeddings=max(seq, 64), **shape)
    return Task("lm", make, batches, describe={
        "model": "LLaMA-shaped, hidden {hidden_size}, {num_hidden_layers} layers, {num_attention_heads} heads, "
                 "intermediate {intermediate_size}, vocab {vocab_size}, untied, random init".format(**shape),
        "data": f"Shakespeare's plays (Gutenberg, front matter stripped), MiniLM WordPiece tokens, "
                f"{len(batches)} batches of {batch} x {seq}", "batch": batch, "seq": seq})


def genre_task(batch: int = 8, max_length: int = 96, steps: int = 64, train_per_class: int = 400,
               test_per_class: int = 60, seed: int = 0) -> Task:
    from transformers import AutoModelForSequenceClassification

    from hift.demo.assets import minilm_model
    from hift.demo.shakespeare import genre_loaders

    tokenizer = minilm_tokenizer()
    train_loader, test_loader, labels = genre_loaders(tokenizer, batch_size=batch, max_length=max_length,
                                                      train_per_class=train_per_class,
                                                      test_per_class=test_per_class, seed=seed)
    batches = []
    while len(batches) < steps:
        batches += list(train_loader)
    batches = batches[:steps]
    test_batches = list(test_loader)
    path = minilm_model()

    def make():
        torch.manual_seed(seed)
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)})

    @torch.no_grad()
    def evaluate(model) -> float:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        correct = total = 0
        for b in test_batches:
            inputs = {k: v.to(device) for k, v in b.items() if k != "labels"}
            predicted = model(**inputs).logits.argmax(-1).cpu()
            correct += int((predicted == b["labels"]).sum())
            total += len(b["labels"])
        model.train(was_training)
        return correct / total

    test = test_loader.dataset
    return Task("genre", make, batches, evaluate, describe={
        "model": "all-MiniLM-L6-v2 + new 3-way classifier head",
        "data": f"Shakespeare passages by Folio genre; train {len(train_loader.dataset)} passages, "
                f"test {len(test)} from held-out plays ({', '.join(test.plays)})",
        "batch": batch, "seq": f"<= {max_length} (padded per batch)"})


def build(name: str, **kwargs) -> Task:
    return {"tiny": tiny_task, "lm": lm_task, "genre": genre_task}[name](**kwargs)
