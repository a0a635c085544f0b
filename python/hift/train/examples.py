"""Records -> tokenized examples -> padded batches.

Language-model formats become {input_ids, labels} with -100 on every token the loss must not
see: none for `text`, the prompt for `prompt_completion`, everything but the assistant turns
for `messages`. Which tokens those are comes from the character offsets of the whole rendered
text (a fast tokenizer), so the tokens are the ones the model would see at inference, not the
pieces tokenized apart. Classification becomes {input_ids, label id}.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from hift.train import TrainError
from hift.train.records import Record

IGNORE = -100
CHUNK = 1000  # records tokenized per call


@dataclass
class Labels:
    """Classification labels: class names (or None when the data holds integer ids) and the
    size of the head."""

    names: Optional[list[str]]
    num_labels: int
    origin: str  # where num_labels came from, said when a label is out of range

    def id_of(self, where: str, value) -> int:
        if self.names is not None:
            if not isinstance(value, str):
                raise TrainError(f"{where}: label {value!r} is an integer, the training labels are class "
                                 f"names ({', '.join(self.names)}); use one kind throughout")
            if value not in self.names:
                raise TrainError(f"{where}: label {value!r} is not one of the training labels "
                                 f"({', '.join(self.names)})")
            return self.names.index(value)
        if not isinstance(value, int):
            raise TrainError(f"{where}: label {value!r} is a name, the training labels are integer ids; "
                             "use one kind throughout")
        if not 0 <= value < self.num_labels:
            raise TrainError(f"{where}: label {value} is out of range: {self.origin} has "
                             f"{self.num_labels} labels (0..{self.num_labels - 1}). Fix the label, or "
                             f"pass --num-labels {max(value + 1, self.num_labels)} for a head that has it")
        return value


def labels_of(records: list[Record], num_labels: Optional[int], model_config) -> Labels:
    """The label set: names from the data (or the model's own label2id, where it names them
    all), and the head size from --num-labels, else the model's own classifier head, else the data."""
    head = None
    if any(a.endswith("ForSequenceClassification") for a in getattr(model_config, "architectures", None) or ()):
        head = getattr(model_config, "num_labels", None)
    values = [r["label"] for _, r in records]
    if all(isinstance(v, str) for v in values):
        names = sorted(set(values))
        own = dict(getattr(model_config, "label2id", None) or {})
        if head and set(names) <= set(own) and num_labels in (None, head):  # the head's own names
            found = Labels([n for n, _ in sorted(own.items(), key=lambda kv: kv[1])], head,
                           "the model's classifier head")
        else:
            size = num_labels or len(names)
            if len(names) > size:
                raise TrainError(f"the training data has {len(names)} labels ({', '.join(names)}) but "
                                 f"--num-labels is {size}; raise it, or drop the extra labels")
            found = Labels(names + [f"LABEL_{i}" for i in range(len(names), size)], size,
                           "--num-labels" if num_labels else "the training data")
    elif all(isinstance(v, int) for v in values):
        if num_labels:
            found = Labels(None, num_labels, "--num-labels")
        elif head:
            found = Labels(None, head, "the model's classifier head")
        else:
            found = Labels(None, max(values) + 1, "the training data (its largest label + 1)")
        for where, record in records:
            found.id_of(where, record["label"])
    else:
        where = next(w for w, r in records if not isinstance(r["label"], type(values[0])))
        raise TrainError(f"{where}: the labels mix integer ids and names; use one kind throughout")
    if found.num_labels < 2:
        raise TrainError(f"classification needs at least 2 labels; the data has {found.num_labels}. "
                         "Pass --num-labels, or use a text format for language modelling")
    return found


def tokenize(records: list[Record], fmt: str, tokenizer, max_length: int,
             labels: Optional[Labels] = None) -> list[dict]:
    """One example per record, or a TrainError naming the record that cannot be one."""
    if fmt == "classification":
        return _classification(records, tokenizer, max_length, labels)
    if fmt in ("prompt_completion", "messages") and not getattr(tokenizer, "is_fast", False):
        raise TrainError(f"format {fmt} masks the prompt by the tokens' character offsets, which need a "
                         "fast tokenizer (a tokenizer.json in the model directory)")
    texts, spans, special = _rendered(records, fmt, tokenizer)
    eos = tokenizer.eos_token_id
    examples = []
    for start in range(0, len(records), CHUNK):
        part = slice(start, start + CHUNK)
        encoded = tokenizer(texts[part], add_special_tokens=special, return_offsets_mapping=fmt != "text")
        for i, ids in enumerate(encoded["input_ids"]):
            where, _ = records[start + i]
            if fmt == "text":
                targets = list(ids)
            else:
                trained = spans[start + i]
                targets = [t if e > s and any(a <= s < b for a, b in trained) else IGNORE
                           for t, (s, e) in zip(ids, encoded["offset_mapping"][i])]
            if fmt != "messages" and eos is not None and (not ids or ids[-1] != eos):
                ids, targets = [*ids, eos], [*targets, eos]  # teach the model where the text ends
            ids, targets = ids[:max_length], targets[:max_length]
            if not any(t != IGNORE for t in targets[1:]):  # position 0 predicts nothing
                raise TrainError(_nothing_to_train(where, fmt, len(ids), max_length))
            examples.append({"input_ids": ids, "labels": targets})
    return examples


def _nothing_to_train(where: str, fmt: str, length: int, max_length: int) -> str:
    if fmt == "text":
        return f"{where}: the text is {length} token(s); a language model needs at least 2 to learn from"
    what = "the prompt" if fmt == "prompt_completion" else "the turns before the first assistant reply"
    return (f"{where}: no token to train on is left after truncation to --max-length {max_length}: "
            f"{what} fills it. Raise --max-length, or shorten the record")


def _rendered(records: list[Record], fmt: str, tokenizer):
    """(texts, the character spans to train on in each, whether the tokenizer adds its special
    tokens)."""
    if fmt == "text":
        return [r["text"] for _, r in records], [None] * len(records), True
    if fmt == "prompt_completion":
        texts = [r["prompt"] + r["completion"] for _, r in records]
        return texts, [[(len(r["prompt"]), len(t))] for (_, r), t in zip(records, texts)], True
    if not getattr(tokenizer, "chat_template", None):
        raise TrainError("format messages renders each chat with the tokenizer's chat template, and this "
                         "tokenizer has none: set tokenizer.chat_template and save it into the model "
                         "directory, or give the data as prompt/completion")
    texts, spans, unmasked = [], [], 0
    for where, record in records:
        text, trained = _chat_spans(where, record["messages"], tokenizer)
        if trained is None:
            unmasked += 1
            trained = [(0, len(text))]
        texts.append(text)
        spans.append(trained)
    if unmasked:
        warnings.warn(f"{unmasked} of {len(records)} chats render differently when cut after a turn "
                      "(the chat template rewrites earlier turns), so their assistant turns could not be "
                      "told apart: every token of those chats is trained on", stacklevel=2)
    return texts, spans, False  # the template writes the special tokens itself


def _chat_spans(where: str, messages: list[dict], tokenizer):
    """The rendered chat and the character span of each assistant turn: the text that rendering
    through that turn adds to rendering up to it with the generation prompt (so the assistant
    header stays masked and the end-of-turn marker is trained). None where the renderings are
    not prefixes of one another."""
    def render(upto: list[dict], prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(upto, tokenize=False, add_generation_prompt=prompt)
        except Exception as err:
            raise TrainError(f"{where}: the chat template refused these messages ({type(err).__name__}: "
                             f"{err})") from None

    full = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            return full, None
        spans.append((len(before), len(through)))
    return full, spans


def _classification(records: list[Record], tokenizer, max_length: int, labels: Labels) -> list[dict]:
    examples = []
    for start in range(0, len(records), CHUNK):
        part = records[start: start + CHUNK]
        encoded = tokenizer([r["text"] for _, r in part], truncation=True, max_length=max_length)
        for (where, record), ids in zip(part, encoded["input_ids"]):
            examples.append({"input_ids": list(ids), "labels": labels.id_of(where, record["label"])})
    return examples


class Collate:
    """Pads a list of examples on the right into one batch: input_ids, attention_mask, labels
    (-100 under the padding)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        per_token = isinstance(examples[0]["labels"], list)
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long) if per_token else \
            torch.tensor([e["labels"] for e in examples], dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e["input_ids"])
            input_ids[row, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
            mask[row, :n] = 1
            if per_token:
                labels[row, :n] = torch.tensor(e["labels"], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
