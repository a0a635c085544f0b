"""`hift train` end to end on a tiny local model directory (a LLaMA of 2 blocks and a word-level
tokenizer with a chat template, saved with save_pretrained) and small JSON-lines files: each data
format trains and writes its outputs, the masks are where they belong, a config file sits under
the flags, --resume after an interruption ends on the weights of a straight run, and bad input
is refused in words before any step."""
import dataclasses
import json
import os
import random
import signal
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hift import checkpoint, cli, model_weights
from hift.config import Config
from hift.train import TrainError
from hift.train import examples as ex
from hift.train import options as opts
from hift.train import records as rec
from hift.train import run as train_run
from torchrun_like import reference_threads

WORDS = ("the cat sat on mat dog ran to park a red blue green is what color sky grass good bad "
         "movie great awful loved hated it").split()
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS + list("?.,!:"))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=SPECIAL[4:])
    fast.chat_template = CHAT
    return fast


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=24, num_attention_heads=2,
                                 num_hidden_layers=2, intermediate_size=40, num_key_value_heads=1,
                                 max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                                 pad_token_id=0)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def records_of(fmt: str, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        thing, colour = rng.choice([("sky", "blue"), ("grass", "green")])
        good = rng.random() < 0.5
        out.append({
            "text": {"text": rng.choice(["the cat sat on the mat .", "the dog ran to the park .",
                                         "a red cat sat on a blue mat ."])},
            "prompt_completion": {"prompt": f"what color is the {thing} ?", "completion": f" {colour} ."},
            "messages": {"messages": [{"role": "user", "content": f"what color is the {thing} ?"},
                                      {"role": "assistant", "content": f"the {thing} is {colour} ."}]},
            "classification": {"text": rng.choice(["loved it great movie", "a good movie", "great"] if good
                                                  else ["hated it awful movie", "a bad movie", "awful"]),
                               "label": "good" if good else "bad"},
        }[fmt])
    return out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def training_records(out) -> list[str]:
    """metrics.jsonl's lines but the claim check's (measured memory differs from run to run)."""
    return [line for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if '"memory"' not in line]


def args(model_dir, data, out, *more):
    return ["--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--batch-size", "4",
            "--lr", "1e-2", "--no-progress", *map(str, more)]


def final_weights(out):
    return load_file(str(out / "final" / "model.safetensors"))


FORMATS = ("text", "prompt_completion", "messages", "classification")


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_trains_and_writes_its_outputs(fmt, model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", records_of(fmt, 24))
    held = write_jsonl(tmp_path / "dev.jsonl", records_of(fmt, 8, seed=1))
    out = tmp_path / "run"
    done = train_run.run(args(model_dir, data, out, "--eval-data", held, "--max-steps", 30, "--eval-every", 10))

    assert done.format == fmt
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (out / "final").iterdir()}
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    assert all(set(r) == {"step", "loss", "lr", "group"} for r in steps)
    assert [r["loss"] for r in steps] == pytest.approx(done.result.losses, rel=1e-6)  # fit's own record
    first, last = (sum(r["loss"] for r in part) / 5 for part in (steps[:5], steps[-5:]))
    assert last < 0.8 * first, (first, last)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 10, 20, 30]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    # the claim check: the planner's host peak beside the measured one (a CPU run: no device peak)
    (memory,) = [r["memory"] for r in rows if "memory" in r]
    assert rows[-1] == {"step": 30, "memory": memory}
    # (a small run's growth can be 0: the allocator reuses pages the process already holds)
    assert memory["predicted_host_peak"] > 0 and memory["measured_host_peak"] >= 0
    assert memory["host_ratio"] == pytest.approx(memory["measured_host_peak"] / memory["predicted_host_peak"])
    if fmt == "classification":
        assert evals[-1]["eval_accuracy"] >= 0.75
        assert json.loads((out / "final" / "config.json").read_text())["id2label"] == {"0": "bad", "1": "good"}


def test_prompt_and_everything_but_the_assistant_turns_are_masked(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = tokenizer.get_vocab()
    pc = [("a", {"prompt": "what color is the sky ?", "completion": " blue ."})]
    (example,) = ex.tokenize(pc, "prompt_completion", tokenizer, 64)
    # <s> what color is the sky ? | blue . </s>
    assert example["input_ids"][-3:] == [vocab["blue"], vocab["."], tokenizer.eos_token_id]
    assert example["labels"] == [ex.IGNORE] * 7 + example["input_ids"][-3:]

    chat = [("b", {"messages": [{"role": "user", "content": "what color is the sky ?"},
                                {"role": "assistant", "content": "blue ."},
                                {"role": "user", "content": "the grass ?"},
                                {"role": "assistant", "content": "green ."}]})]
    (example,) = ex.tokenize(chat, "messages", tokenizer, 64)
    trained = [tokenizer.convert_ids_to_tokens(t) for t in example["labels"] if t != ex.IGNORE]
    assert trained == ["blue", ".", "<|end|>", "green", ".", "<|end|>"]  # headers and user turns masked

    (example,) = ex.tokenize(pc, "prompt_completion", tokenizer, 8)
    assert example["labels"][-1] == vocab["blue"]  # truncated: the completion's first token is left


def test_a_template_that_rewrites_earlier_turns_trains_on_everything_with_a_warning(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # a template that drops every assistant turn but the last (as some drop earlier reasoning)
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                               "<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    chat = [("c", {"messages": [{"role": "user", "content": "sky ?"}, {"role": "assistant", "content": "blue"},
                                {"role": "user", "content": "grass ?"}, {"role": "assistant", "content": "green"}]})]
    with pytest.warns(UserWarning, match="every token of those chats is trained on"):
        (example,) = ex.tokenize(chat, "messages", tokenizer, 64)
    assert example["labels"] == example["input_ids"]


def test_a_config_file_sits_under_the_flags(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", records_of("text", 12))
    # YAML reads 3e-3 as text: it is converted as the flag would convert it
    (tmp_path / "run.yaml").write_text(
        f"model: {model_dir}\ndata: {data}\nlr: 3e-3\nlr_schedule: constant\ngroup-size: 2\nmax_steps: 3\n"
        "betas: [0.8, 0.99]\nprogress: false\nbatch_size: 4\n")
    out = tmp_path / "run"
    done = train_run.run(["--config", str(tmp_path / "run.yaml"), "--output-dir", str(out), "--max-steps", "4"])
    assert done.result.steps == 4 and done.result.num_groups == 3  # 5 units, 2 per group
    assert done.result.lrs == [3e-3] * 4

    (tmp_path / "run.json").write_text(json.dumps({"model": str(model_dir), "data": str(data), "max_steps": 2,
                                                   "progress": False, "output_dir": str(tmp_path / "j")}))
    assert train_run.run(["--config", str(tmp_path / "run.json")]).result.steps == 2


def test_every_config_field_is_a_flag_and_the_help_reads(capsys):
    parser = opts.build_parser()
    dests = {a.dest for a in parser._actions}
    fields = {f.name for f in dataclasses.fields(Config)}
    assert fields - dests == set(opts.NOT_FLAGS)
    own = {flag[2:].replace("-", "_") for flag, _ in opts.TRAIN_OPTIONS}
    assert not own & fields
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--lr", "--group-size", "--state-store {host,disk}", "--eval-data", "--resume", "--config FILE",
                 "--prefetch, --no-prefetch", "units per group; K = ceil(units / group_size)"):
        assert flag in text


@pytest.fixture
def interrupt_at(monkeypatch):
    """interrupt_at(N): on_step raises KeyboardInterrupt after step N (as Ctrl-C would); None: never."""
    at = {"step": None}
    original = train_run.Monitor.on_step

    def on_step(self, event):
        original(self, event)
        if event.step + 1 == at["step"]:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_run.Monitor, "on_step", on_step)
    return lambda step: at.update(step=step)


def test_resume_after_an_interruption_ends_where_a_straight_run_does(model_dir, tmp_path, interrupt_at):
    data = write_jsonl(tmp_path / "train.jsonl", records_of("prompt_completion", 18))
    held = write_jsonl(tmp_path / "dev.jsonl", records_of("prompt_completion", 6, seed=1))
    common = ["--eval-data", held, "--eval-every", 4, "--max-steps", 14, "--save-every", 3, "--order", "random",
              "--batch-size", 4]  # 5 batches a pass: the interruption falls mid-epoch
    straight = tmp_path / "straight"
    train_run.run(args(model_dir, data, straight, *common))

    out = tmp_path / "interrupted"
    interrupt_at(8)
    with pytest.raises(KeyboardInterrupt):
        train_run.run(args(model_dir, data, out, *common))
    assert not (out / "final").exists() and (out / "step-00000006").is_dir()
    with pytest.raises(TrainError, match="already holds a run .*--resume to continue it"):
        train_run.run(args(model_dir, data, out, *common))
    interrupt_at(None)
    train_run.run(args(model_dir, data, out, *common, "--resume"))

    expected, got = final_weights(straight), final_weights(out)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert training_records(out) == training_records(straight)


KILLED_AT = textwrap.dedent("""
    import os, signal, sys
    from hift.train import run

    original = run.Monitor.on_step

    def on_step(self, event):
        original(self, event)
        if event.step + 1 == int(os.environ["HIFT_TEST_KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)

    run.Monitor.on_step = on_step
    sys.exit(run.main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_resume_after_the_process_is_killed_ends_where_a_straight_run_does(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", records_of("classification", 18))
    held = write_jsonl(tmp_path / "dev.jsonl", records_of("classification", 6, seed=1))
    common = ["--eval-data", held, "--eval-every", 4, "--max-steps", 12, "--save-every", 3, "--log-every", 2]
    train_run.run(args(model_dir, data, tmp_path / "straight", *common))

    out = tmp_path / "killed"
    env = {**os.environ, "HIFT_TEST_KILL_AT": "8"}
    killed = subprocess.run([sys.executable, "-c", KILLED_AT, *args(model_dir, data, out, *common)], env=env,
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert checkpoint.latest(out).name == "step-00000006"
    resumed = subprocess.run([sys.executable, "-m", "hift.cli", "train", *args(model_dir, data, out, *common),
                              "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr

    expected, got = final_weights(tmp_path / "straight"), final_weights(out)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert training_records(out) == training_records(tmp_path / "straight")


def test_resume_with_more_steps_continues_the_run(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", records_of("messages", 10))
    common = ["--lr-schedule", "constant", "--batch-size", 3]  # the same lr whatever the run's length
    train_run.run(args(model_dir, data, tmp_path / "straight", *common, "--max-steps", 9))
    out = tmp_path / "run"
    assert train_run.run(args(model_dir, data, out, *common, "--max-steps", 5)).result.steps == 5
    assert train_run.run(args(model_dir, data, out, *common, "--max-steps", 9, "--resume")).result.steps == 9
    a, b = final_weights(tmp_path / "straight"), final_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_evaluating_changes_nothing_the_run_does(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", records_of("text", 12))
    held = write_jsonl(tmp_path / "dev.jsonl", records_of("text", 5, seed=1))
    train_run.run(args(model_dir, data, tmp_path / "a", "--max-steps", 6))
    train_run.run(args(model_dir, data, tmp_path / "b", "--max-steps", 6, "--eval-data", held, "--eval-every", 1))
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_datasets_directory_trains(model_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records_of("classification", 8)),
                          "dev": datasets.Dataset.from_list(records_of("classification", 4, seed=1))}
                         ).save_to_disk(str(tmp_path / "ds"))
    done = train_run.run(args(model_dir, tmp_path / "ds", tmp_path / "run", "--eval-data", tmp_path / "ds",
                              "--eval-split", "dev", "--max-steps", 2))
    assert done.format == "classification" and "eval_accuracy" in done.eval_metrics
    with pytest.raises(TrainError, match="has no split 'test'; its splits are train, dev"):
        train_run.run(args(model_dir, tmp_path / "ds", tmp_path / "run2", "--split", "test"))


LINES = "".join(json.dumps(r) + "\n" for r in records_of("text", 4))
LABELLED = "".join(json.dumps({"text": t, "label": y}) + "\n"
                   for t, y in (("a good movie", 0), ("awful", 1), ("great", 3)))
CONFIG = ["--config", "{tmp}/c.yaml"]
# case: (more arguments, files to write under {tmp}, the error's words); the data is {tmp}/d.jsonl
BAD = {
    "missing field": (["--format", "prompt_completion"], {"d.jsonl": LINES},
                      r"d.jsonl line 1: no 'prompt', 'completion' field"),
    "missing field later": ([], {"d.jsonl": '{"prompt": "a", "completion": " b"}\n{"prompt": "a"}\n'},
                            r"d.jsonl line 2: no 'completion' field"),
    "no known fields": ([], {"d.jsonl": '{"body": "x"}\n'}, r"line 1: its fields \['body'\] match no format"),
    "empty file": ([], {"d.jsonl": "\n"}, r"d.jsonl holds no records"),
    "malformed line": ([], {"d.jsonl": LINES + '{"text": "the cat"\n'}, r"d.jsonl line 5: not valid JSON"),
    "one object over many lines": ([], {"d.jsonl": '{\n  "text": "the cat"\n}\n'},
                                   r"d.jsonl is one JSON object spread over many lines"),
    "not an object": ([], {"d.jsonl": '["the cat"]\n'}, r"d.jsonl record 1: a JSON str, not an object"),
    "wrong type": ([], {"d.jsonl": '{"text": 3}\n'}, r"line 1: 'text' must be a string, not int"),
    "label out of range": (["--num-labels", "2"], {"d.jsonl": LABELLED},
                           r"line 3: label 3 is out of range: --num-labels has 2 labels \(0..1\).*--num-labels 4"),
    "one label": ([], {"d.jsonl": '{"text": "great", "label": 0}\n'}, r"at least 2 labels"),
    "no assistant turn": ([], {"d.jsonl": '{"messages": [{"role": "user", "content": "a"}]}\n'},
                          r"line 1: no message has role 'assistant'"),
    "prompt fills max length": (["--max-length", "4"],
                                {"d.jsonl": '{"prompt": "what color is the sky ?", "completion": " blue"}\n'},
                                r"line 1: no token to train on is left after truncation to --max-length 4"),
    "not a model directory": (["--model", "{tmp}/not-a-model"], {"d.jsonl": LINES, "not-a-model/weights.bin": ""},
                              r"is not a model directory: it has no config.json"),
    "no such model": (["--model", "{tmp}/nowhere"], {"d.jsonl": LINES}, r"no such directory"),
    "no such data": (["--data", "{tmp}/missing.jsonl"], {}, r"missing.jsonl: no such file"),
    "unknown config key": (CONFIG, {"d.jsonl": LINES, "c.yaml": "lrr: 0.1\n"},
                           r"c.yaml: unknown option 'lrr'; did you mean 'lr'\?"),
    "unusable config key": (CONFIG, {"d.jsonl": LINES, "c.yaml": "on_step: 1\n"},
                            r"unknown option 'on_step' \(a Python callable"),
    "bad config value": (CONFIG, {"d.jsonl": LINES, "c.yaml": "lr: fast\n"},
                         r"c.yaml: lr: could not convert string to float"),
    "config validation": (["--lr", "-1"], {"d.jsonl": LINES}, r"lr must be a finite number >= 0.*flag --lr"),
    "resume without a checkpoint": (["--resume"], {"d.jsonl": LINES}, r"--resume: no checkpoint in"),
    "eval every without eval data": (["--eval-every", "5"], {"d.jsonl": LINES},
                                     r"--eval-every evaluates --eval-data"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_refused_in_words_before_any_step(case, model_dir, tmp_path, monkeypatch):
    more, files, message = BAD[case]
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    import hift

    monkeypatch.setattr(hift, "fit", lambda *a, **k: pytest.fail("fit ran"))
    out = tmp_path / "run"
    more = [m.replace("{tmp}", str(tmp_path)) for m in more]
    with pytest.raises(TrainError, match=message):
        train_run.run(args(model_dir, tmp_path / "d.jsonl", out, "--max-steps", 2, *more))
    assert not out.exists()


def test_the_command_line_says_the_error_and_exits_2(model_dir, tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"text": "the cat"}\n{"text": \n')
    code = cli.main(["train", *args(model_dir, tmp_path / "d.jsonl", tmp_path / "run")])
    assert code == 2
    assert "hift train: error: " in capsys.readouterr().err


def test_the_format_is_detected_from_the_first_record():
    assert rec.detect_format([("x", {"text": "a", "label": 1})]) == "classification"
    assert rec.detect_format([("x", {"prompt": "a", "completion": "b", "text": "c"})]) == "prompt_completion"
    assert rec.detect_format([("x", {"messages": [], "text": "c"})]) == "messages"
    assert rec.detect_format([("x", {"text": "a", "label": 1})], "text") == "text"


def torchrun_train(argv: list[str]) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m hift.cli train <argv>` on two gloo ranks, finished cleanly."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           "-m", "hift.cli", "train", *argv], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def one_process_then_torchrun(model_dir, tmp_path, record: dict, options: list, *torchrun_only):
    """The same `hift train` on 16 copies of `record` (4 held out for evaluation) in one process
    (tmp_path/one) and under torchrun on two ranks (tmp_path/two, with `torchrun_only` added):
    the data, the options both runs took, and torchrun's finished process."""
    data = write_jsonl(tmp_path / "train.jsonl", [record] * 16)
    held = write_jsonl(tmp_path / "dev.jsonl", [record] * 4)
    common = ["--eval-data", held, "--eval-every", 4, *options]
    with reference_threads():
        train_run.run(args(model_dir, data, tmp_path / "one", *common))
    return data, common, torchrun_train([*args(model_dir, data, tmp_path / "two", *common), *torchrun_only])


@pytest.mark.slow
@pytest.mark.bitwise
def test_torchrun_trains_data_parallel_and_writes_once(model_dir, tmp_path):
    """`torchrun --nproc_per_node 2 -m hift.cli train`: two gloo ranks, each a share of every pass.
    Every record is the same, so every rank's batch is too and the mean over ranks is exact: the
    run must end where one process does, with the same metrics.jsonl written once (rank 0's), and
    checkpoints sharded by rank."""
    data, common, done = one_process_then_torchrun(
        model_dir, tmp_path, {"text": "a red cat sat on a blue mat ."},
        ["--max-steps", 10, "--save-every", 5, "--order", "random", "--moment-dtype", "int8"])
    out = tmp_path / "two"
    assert done.stdout.count("hift train: 10 steps") == 1  # the summary, from rank 0 alone
    assert "x 2 ranks (data parallel, batch 4 per rank)" in done.stdout

    expected, got = final_weights(tmp_path / "one"), final_weights(out)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert training_records(out) == training_records(tmp_path / "one")
    saved = checkpoint.latest(out)
    assert saved.name == "step-00000010"
    assert {p.name for p in (saved / "state").iterdir()} >= {"rank-00000", "rank-00001"}

    # the two ranks' step 5 resumed in one process, their global batch as 2 micro-batches of 4:
    # each micro-batch is a rank's batch, so the run again ends where one process does
    back = tmp_path / "back"
    shutil.copytree(out, back)
    shutil.rmtree(back / "step-00000010")
    with reference_threads():
        resumed = train_run.run(args(model_dir, data, back, *common, "--accum-steps", 2, "--resume"))
    assert resumed.result.steps == 10
    got = final_weights(back)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert training_records(back) == training_records(tmp_path / "one")


@pytest.mark.slow
def test_torchrun_with_sharded_weights_ends_where_one_process_does(model_dir, tmp_path):
    """`torchrun ... hift.cli train --shard-weights`: FSDP2 over two gloo ranks with the same
    batch on each (FSDP's mean of two equal gradients is exact), evaluating on every rank (a
    sharded forward is a collective) and writing once: one process's metrics and final weights,
    bit for bit, and a final/ that is one model (the ranks' rows gathered)."""
    _, _, done = one_process_then_torchrun(
        model_dir, tmp_path, {"prompt": "the red cat sat on", "completion": " a blue mat ."},
        ["--max-steps", 6, "--save-every", 3, "--order", "random", "--memory", "manual"], "--shard-weights")
    out = tmp_path / "two"
    assert done.stdout.count("hift train: 6 steps") == 1
    assert "x 2 ranks (weights sharded by FSDP2, batch 4 per rank)" in done.stdout
    assert training_records(out) == training_records(tmp_path / "one")
    expected = final_weights(tmp_path / "one")
    got = {k: v for f in sorted((out / "final").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert got.keys() == expected.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert (out / "final" / "tokenizer.json").is_file() and (out / "final" / "config.json").is_file()
    assert model_weights.saved_files(checkpoint.latest(out))[0].startswith("model/")
