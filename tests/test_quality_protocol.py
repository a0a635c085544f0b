"""The quality protocol (bench/quality.py): its learning-rate selection never reads the test
split, a finished cell is never recomputed, a killed run continues where it stopped, and
--quick runs end to end. The fast tests use the tiny task (random tokens, no downloads); the
slow ones the real genre and LM tasks, where the demo's assets are cached."""
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds bench/

from bench import quality
from bench.quality import Protocol, run, select, validation_only
from bench.quality_cells import write_cell

SPECS = ["adamw", quality.HIFT_DEFAULT, "lomo"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _picks(protocol, specs):
    return {s: protocol.selection(s)["lr"] for s in specs}


def _cells(run_dir: Path) -> dict:
    return {p.relative_to(run_dir).as_posix(): json.loads(p.read_text())
            for p in sorted(run_dir.rglob("lr*_seed*.json"))}


def test_selection_does_not_move_when_the_test_labels_are_poisoned(tmp_path):
    clean = Protocol("tiny", tmp_path / "clean", quick=True)
    poisoned = Protocol("tiny", tmp_path / "poisoned", quick=True, task_args={"poison_test": True})
    assert run(clean, SPECS, log=lambda *a, **k: None)
    assert run(poisoned, SPECS, log=lambda *a, **k: None)
    assert _picks(clean, SPECS) == _picks(poisoned, SPECS)
    assert all(lr is not None for lr in _picks(clean, SPECS).values())
    a, b = _cells(tmp_path / "clean"), _cells(tmp_path / "poisoned")
    assert a.keys() == b.keys()  # the same cells, so the same final lrs and seeds
    # The poison reached the test split (every test result moved: the 2 classes' labels swapped)
    # and nothing else: validation and training are the same to the bit.
    for key in a:
        assert [e["val"] for e in a[key]["evals"]] == [e["val"] for e in b[key]["evals"]]
        assert a[key]["losses"] == b[key]["losses"]
        assert [e["test"] for e in a[key]["evals"]] != [e["test"] for e in b[key]["evals"]]


def test_what_the_selection_reads_holds_no_test_result():
    record = {"steps": 4, "diverged": None, "evals": [
        {"step": 4, "cpu_seconds": 1.0, "val": {"accuracy": 0.5, "loss": 0.7}, "test": {"accuracy": 0.9, "loss": 0.1}}]}
    seen = validation_only(record, 1e-3)
    assert seen == {"lr": 1e-3, "val": 0.5, "val_loss": 0.7, "diverged": None}
    trials = [{"lr": 1e-4, "val": 0.5, "val_loss": 0.6}, {"lr": 1e-3, "val": 0.5, "val_loss": 0.7},
              {"lr": 1e-2, "val": None, "val_loss": None, "diverged": "step 3"}]
    assert select(trials, higher_is_better=True) == 1e-4  # tie on the metric: lower validation loss
    assert select([{"lr": 1, "val": 30.0, "val_loss": 3.4}, {"lr": 2, "val": 20.0, "val_loss": 3.0}],
                  higher_is_better=False) == 2
    assert select([{"lr": 1, "val": None, "val_loss": None}], higher_is_better=True) is None


def test_a_pick_at_the_grid_edge_adds_one_lr_beyond_it(tmp_path):
    protocol = Protocol("tiny", tmp_path, quick=True)  # quick grid: published lr x 1, 10
    base = protocol.grid("adamw")

    def finished(lr, accuracy):
        evals = [{"step": protocol.steps, "cpu_seconds": 1.0, "val": {"accuracy": accuracy, "loss": 1 - accuracy},
                  "test": {"accuracy": 0.5, "loss": 0.7}}]
        write_cell(protocol.path("adamw", lr, 0), {"steps": protocol.steps, "diverged": None, "evals": evals})

    finished(base[0], 0.6)
    assert protocol.grid("adamw") == base  # not complete: no pick, no extension
    finished(base[1], 0.7)
    up = protocol.grid("adamw")
    assert up[:2] == base and len(up) == 3 and up[2] > base[1]
    finished(up[2], 0.65)
    assert protocol.selection("adamw")["lr"] == base[1] and protocol.grid("adamw") == up  # one extension only


def test_a_finished_cell_is_reused_and_a_missing_one_recomputed(tmp_path, monkeypatch):
    protocol = Protocol("tiny", tmp_path, quick=True)
    assert run(protocol, ["adamw"], log=lambda *a, **k: None)
    paths = sorted(tmp_path.rglob("lr*_seed*.json"))
    assert len(paths) == len(protocol.grid("adamw")) + len(protocol.seeds) - 1
    marked = json.loads(paths[0].read_text())
    marked["marker"] = "written by the first run"
    paths[0].write_text(json.dumps(marked))
    paths[-1].unlink()

    calls = []
    real = quality.run_cell

    def counting(task, spec, lr, seed, steps, eval_every):
        calls.append((spec, lr, seed))
        return real(task, spec, lr, seed, steps, eval_every)

    monkeypatch.setattr(quality, "run_cell", counting)
    again = Protocol("tiny", tmp_path, quick=True)
    assert run(again, ["adamw"], log=lambda *a, **k: None)
    assert len(calls) == 1 and paths[-1].exists()
    assert json.loads(paths[0].read_text())["marker"] == "written by the first run"


def test_a_killed_run_continues_where_it_stopped(tmp_path, monkeypatch):
    calls = []
    real = quality.run_cell

    def dies_on_the_third(task, spec, lr, seed, steps, eval_every):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process killed mid-cell: that cell leaves no file
        calls.append((spec, lr, seed))
        return real(task, spec, lr, seed, steps, eval_every)

    monkeypatch.setattr(quality, "run_cell", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        run(Protocol("tiny", tmp_path, quick=True), SPECS, log=lambda *a, **k: None)
    assert len(list(tmp_path.rglob("lr*_seed*.json"))) == 2
    assert not list(tmp_path.rglob("*.tmp*"))

    def counting(task, spec, lr, seed, steps, eval_every):
        calls.append((spec, lr, seed))
        return real(task, spec, lr, seed, steps, eval_every)

    monkeypatch.setattr(quality, "run_cell", counting)
    protocol = Protocol("tiny", tmp_path, quick=True)
    assert run(protocol, SPECS, log=lambda *a, **k: None)
    planned = quality.plan(protocol, SPECS)
    assert sorted(calls, key=str) == sorted(planned, key=str)  # every cell once, none twice


def test_a_run_dir_with_other_settings_is_refused(tmp_path):
    Protocol("tiny", tmp_path, quick=True).check_run_dir()
    with pytest.raises(SystemExit, match="other settings"):
        Protocol("tiny", tmp_path, quick=True, steps=7).check_run_dir()


def _assets_or_skip():
    from hift.demo import assets

    if not assets.cached():
        pytest.skip("the demo's model and texts are not cached (make demo fetches them)")


@pytest.mark.slow
def test_quick_runs_end_to_end(tmp_path):
    _assets_or_skip()
    assert quality.main(["--quick", "--task", "genre", "--task", "lm", "--run-dir", str(tmp_path)]) == 0
    for task in ("genre", "lm"):
        protocol = Protocol(task, tmp_path, quick=True)
        assert all(protocol.cell(spec, lr, seed) is not None for spec, lr, seed in quality.plan(protocol, quality.MAIN))
        text = (tmp_path / f"quality_{task}.md").read_text()
        assert "not run yet" not in text and "Learning-rate grid" in text
        assert (tmp_path / f"quality_{task}_steps.png").exists() and (tmp_path / f"quality_{task}_time.png").exists()


@pytest.mark.slow
def test_genre_selection_does_not_move_when_the_test_labels_are_poisoned(tmp_path):
    _assets_or_skip()
    specs = ["adamw", quality.HIFT_DEFAULT]
    clean = Protocol("genre", tmp_path / "clean", quick=True)
    poisoned = Protocol("genre", tmp_path / "poisoned", quick=True, task_args={"poison_test": True})
    for p in (clean, poisoned):
        assert run(p, specs, log=lambda *a, **k: None)
    assert _picks(clean, specs) == _picks(poisoned, specs)
    a, b = _cells(tmp_path / "clean"), _cells(tmp_path / "poisoned")
    assert a.keys() == b.keys()
    assert all([e["val"] for e in a[k]["evals"]] == [e["val"] for e in b[k]["evals"]] for k in a)
    assert any([e["test"] for e in a[k]["evals"]] != [e["test"] for e in b[k]["evals"]] for k in a)
