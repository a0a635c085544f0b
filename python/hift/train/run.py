"""`hift train`: check everything, load the model, fit, save.

Every check (options, model directory, tokenizer, data, labels, output directory) runs before
the model's weights are loaded, and all of them before the first training step. The run is
hift.fit with the options as they are; on_step writes metrics.jsonl and evaluates the held-out
data every --eval-every steps. Checkpoints are fit's own (save_dir: the output directory),
which is what --resume continues from. Under torchrun it trains data-parallel (hift.train.ranks).
"""
from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader, DistributedSampler

import hift
from hift import checkpoint, model_weights
from hift.precision import DTYPES
from hift.train import TrainError
from hift.train import examples as ex
from hift.train import records as rec
from hift.train.evaluate import evaluate
from hift.train.metrics import MetricsLog, plot
from hift.train.options import check_config, parse
from hift.train.ranks import Ranks, join

METRICS, PLOT, FINAL = "metrics.jsonl", "loss.png", "final"


@dataclass
class TrainRun:
    """What `hift train` made: the fit's result and where everything went."""

    result: object  # hift.FitResult
    format: str  # the data's format, as detected or forced
    output_dir: Path
    final_dir: Path
    metrics_path: Path
    plot_path: Optional[Path]
    eval_metrics: dict = field(default_factory=dict)  # the last evaluation's


class Monitor:
    """fit's on_step: each step's loss, lr and group into metrics.jsonl, and the held-out data
    evaluated every eval_every steps. The losses are the ones fit records (StepEvent.loss: the
    mean over the step's micro-batches), read from the device every log_every steps together,
    as fit reads its own."""

    def __init__(self, log: Optional[MetricsLog], log_every: int, eval_every: Optional[int], run_eval, say,
                 ranks: Ranks = Ranks(), sharded=lambda: False):
        """Under torchrun every rank keeps one, the losses are averaged over the ranks, and rank
        0 alone (the one with a log) writes; it alone evaluates, unless the model is sharded
        (shard_weights: a forward gathers every rank's rows, so every rank runs it)."""
        self.log, self.log_every, self.eval_every = log, log_every, eval_every
        self.ranks = ranks
        self.run_eval, self.say, self.sharded = run_eval, say, sharded
        self.pending: list[tuple[dict, Optional[torch.Tensor], dict]] = []  # (step, loss on the device, the rest)
        self.last_eval: Optional[int] = None
        self.eval_metrics: dict = {}

    def on_step(self, event) -> None:
        step = event.step + 1
        loss = event.loss.float() if event.loss is not None else None
        self.pending.append(({"step": step}, loss, {"lr": event.lr, "group": event.group}))
        if self.eval_every and step % self.eval_every == 0:
            self.evaluate(step)
        elif step % self.log_every == 0:
            self.flush()

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        known = [loss for _, loss, _ in pending if loss is not None]
        values = iter(self.ranks.mean(torch.stack(known)).tolist() if known else [])
        if self.log is not None:
            self.log.write([{**head, "loss": next(values) if loss is not None else None, **tail}
                            for head, loss, tail in pending])

    def evaluate(self, step: int) -> None:
        self.flush()
        self.last_eval = step
        if self.log is None and not self.sharded():
            return
        metrics = self.run_eval()
        if self.log is None:
            return
        self.eval_metrics = metrics
        self.log.write([{"step": step, **self.eval_metrics}])
        self.say(f"step {step}: {shown(self.eval_metrics)}")


def shown(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.2%}" if k.endswith("accuracy") else f"{k} {v:.4f}" for k, v in metrics.items())


def run(argv=None) -> TrainRun:
    """`hift train` with these arguments; raises TrainError (and fit's own errors) in words."""
    options = parse(argv)
    a = options.train
    for name in ("max_length", "batch_size", "eval_batch_size", "eval_every"):
        value = getattr(a, name)
        if value is not None and value < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if a.eval_every is not None and a.eval_data is None:
        raise TrainError("--eval-every evaluates --eval-data, and none was given: pass --eval-data FILE")
    output_dir = Path(a.output_dir or Path("runs") / Path(str(a.model).rstrip("/")).name)
    fit_options = dict(options.config)
    fit_options["save_dir"] = fit_options["save_dir"] or str(output_dir)
    if a.resume and fit_options["resume_from"] is None:
        fit_options["resume_from"] = fit_options["save_dir"]
    cfg = check_config(fit_options)
    ranks, device_name = join(a.device)
    try:
        return _run(a, options, output_dir, fit_options, cfg, ranks, _device(device_name))
    finally:
        ranks.close()


def _run(a, options, output_dir: Path, fit_options: dict, cfg, ranks: Ranks, device: torch.device) -> TrainRun:
    resume_step = _check_output_dir(output_dir, cfg.save_dir, cfg.resume_from, a.overwrite)

    if not cfg.progress:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    model_config, tokenizer = _load_config_and_tokenizer(a.model)
    fmt, labels, train_examples, eval_examples = _examples(a, model_config, tokenizer)

    torch.manual_seed(cfg.seed)  # a new classifier head's initial weights
    model = _load_model(a.model, fmt, labels, cfg.precision).to(device)
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id  # where a classifier finds each sequence's last token
    collate = ex.Collate(pad_id)
    # each rank its share of every pass (fit tells the sampler each pass); one process too, so
    # that a checkpoint resumes on any number of ranks (the pass goes on after the samples taken)
    sampler = DistributedSampler(train_examples, num_replicas=ranks.world, rank=ranks.rank, shuffle=a.shuffle,
                                 seed=cfg.seed)
    train_loader = DataLoader(train_examples, batch_size=a.batch_size, sampler=sampler, collate_fn=collate)
    eval_loader = None if eval_examples is None else DataLoader(
        eval_examples, batch_size=a.eval_batch_size or a.batch_size, collate_fn=collate)

    if ranks.main:
        if a.overwrite and resume_step is None:
            _clear(output_dir, Path(cfg.save_dir))
        output_dir.mkdir(parents=True, exist_ok=True)
    ranks.barrier()  # (the other ranks start once the output directory is ready)
    say = _printer(cfg.progress) if ranks.main else (lambda text: None)
    if not ranks.main:
        fit_options["progress"] = False  # one progress bar, rank 0's
    params = sum(p.numel() for p in model.parameters())
    say(f"hift train: {a.model} ({params / 1e6:.1f}M parameters, {type(model).__name__}) on {device}"
        + (f" x {ranks.world} ranks ({'weights sharded by FSDP2' if cfg.shard_weights else 'data parallel'}, "
           f"batch {a.batch_size} per rank)" if ranks.world > 1 else "") + "; "
        f"format {fmt}, {len(train_examples)} training examples"
        + (f", {len(eval_examples)} held out" if eval_examples else "")
        + (f"; labels: {', '.join(labels.names) if labels.names else labels.num_labels}" if labels else "")
        + (f"; resuming from step {resume_step}" if resume_step is not None else "") + f" -> {output_dir}")

    classification = fmt == "classification"
    log = MetricsLog(output_dir / METRICS, resume_step) if ranks.main else None
    monitor = Monitor(log, cfg.log_every, a.eval_every,
                      lambda: evaluate(model, eval_loader, device, classification), say, ranks,
                      sharded=lambda: model_weights.is_sharded(model))
    if eval_loader is not None and resume_step is None:
        monitor.evaluate(0)
    started = time.time()
    try:
        result = hift.fit(model, train_loader, **{**fit_options, "on_step": monitor.on_step})
        monitor.flush()
        if eval_loader is not None and monitor.last_eval != result.steps:
            monitor.evaluate(result.steps)
        if log is not None:  # the claim check: the planner's peaks beside the measured ones
            log.write([{"step": result.steps, "memory": result.memory}])
    except KeyboardInterrupt:
        latest = checkpoint.latest(cfg.save_dir)
        say("hift train: interrupted; "
            + (f"--resume continues from {latest}" if latest else "no checkpoint was written yet"))
        raise
    finally:
        monitor.flush()
        plot_path = plot(log.path, output_dir / PLOT) if ranks.main else None
    metrics_path, final = output_dir / METRICS, output_dir / FINAL
    _save_final(model, tokenizer, final, started, ranks.rank)
    if ranks.main:
        say(_summary(result, final, metrics_path, plot_path, monitor.eval_metrics))
    return TrainRun(result, fmt, output_dir, final, metrics_path, plot_path, monitor.eval_metrics)


def _examples(a, model_config, tokenizer):
    """(format, labels, training examples, held-out examples or None): every record read,
    checked and tokenized."""
    train_records = rec.read(a.data, a.split, "--data")
    fmt = rec.detect_format(train_records, a.format)
    rec.check(train_records, fmt)
    eval_records = None
    if a.eval_data is not None:
        eval_records = rec.read(a.eval_data, a.eval_split or a.split, "--eval-data")
        rec.check(eval_records, fmt)
    labels = ex.labels_of(train_records, a.num_labels, model_config) if fmt == "classification" else None
    train_examples = ex.tokenize(train_records, fmt, tokenizer, a.max_length, labels)
    eval_examples = ex.tokenize(eval_records, fmt, tokenizer, a.max_length, labels) if eval_records else None
    return fmt, labels, train_examples, eval_examples


def _device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise TrainError(f"--device {name}: {err}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {name}: this torch sees no CUDA device; use --device cpu")
    return device


def _check_output_dir(output_dir: Path, save_dir: str, resume_from: Optional[str], overwrite: bool) -> Optional[int]:
    """The step to resume from (None for a fresh run); refuses to start afresh over a run."""
    if resume_from is not None:
        try:
            path = checkpoint.resolve(resume_from)
        except checkpoint.CheckpointError as err:
            raise TrainError(f"--resume: {err}. Start without --resume (and keep --save-every so "
                             "that a later run can resume)") from None
        try:
            return int(path.name[len(checkpoint.PREFIX):])
        except ValueError:
            raise TrainError(f"--resume-from {resume_from}: {path.name} is not a step-N checkpoint") from None
    held = [p for p in (*checkpoint.checkpoints(Path(save_dir)), output_dir / METRICS, output_dir / FINAL)
            if p.exists()]
    if held and not overwrite:
        raise TrainError(f"the output directory {output_dir} already holds a run ({held[0].name}); pass "
                         "--resume to continue it, --overwrite to start afresh there, or another --output-dir")
    return None


def _clear(output_dir: Path, save_dir: Path) -> None:
    """What an earlier run wrote (and only that): its checkpoints, final/, metrics and plot."""
    for path in (*checkpoint.checkpoints(save_dir), output_dir / FINAL):
        shutil.rmtree(path, ignore_errors=True)
    for path in (output_dir / METRICS, output_dir / PLOT):
        path.unlink(missing_ok=True)


def _load_config_and_tokenizer(source: str):
    path = Path(source)
    if path.exists() and not path.is_dir():
        raise TrainError(f"--model {source} is a file; give the model's directory (the one holding "
                         "config.json, the weights and the tokenizer, as save_pretrained writes it)")
    if path.is_dir() and not (path / "config.json").is_file():
        raise TrainError(f"--model {source} is not a model directory: it has no config.json. Give a "
                         "directory written by save_pretrained (config.json, the weights, the tokenizer)")
    if not path.exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise TrainError(f"--model {source}: no such directory")
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as err:
        raise TrainError(f"--model {source}: no model config could be read ({type(err).__name__}: {err}). "
                         "Give a local model directory, or a hub id where the hub is reachable") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as err:
        raise TrainError(f"--model {source}: no tokenizer could be loaded ({type(err).__name__}: {err}). "
                         "Save the tokenizer into the model directory (tokenizer.save_pretrained(DIR))") from None
    return config, tokenizer


def _load_model(source: str, fmt: str, labels: Optional[ex.Labels], precision: str):
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    dtype = DTYPES.get(precision, "auto")
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    kwargs = {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}
    cls = AutoModelForCausalLM
    if fmt == "classification":
        cls = AutoModelForSequenceClassification
        kwargs.update(num_labels=labels.num_labels, ignore_mismatched_sizes=True)
        if labels.names is not None:
            kwargs.update(id2label=dict(enumerate(labels.names)), label2id={n: i for i, n in enumerate(labels.names)})
    try:
        return cls.from_pretrained(source, **kwargs)
    except Exception as err:
        raise TrainError(f"--model {source}: the weights could not be loaded as {cls.__name__} "
                         f"({type(err).__name__}: {err})") from None


def _save_final(model, tokenizer, final: Path, started: float, rank: int) -> Path:
    """final/: the trained model (fit writes it under save_dir, which is the output directory
    unless --save-dir moved it) with the tokenizer beside it, from rank 0 (a sharded model's
    rows from every rank: model_weights.save_final)."""
    if not (final / "config.json").is_file() or (final / "config.json").stat().st_mtime < started:
        model_weights.save_final(model, final, rank)
    if not rank:
        tokenizer.save_pretrained(final)
    return final


def _printer(progress: bool):
    def say(text: str) -> None:
        if progress:
            from tqdm.auto import tqdm

            tqdm.write(text)  # above fit's progress bar
        else:
            print(text, flush=True)

    return say


def memory_claim(memory: dict) -> str:
    """The claim check in words: each predicted peak, the measured one and their ratio."""
    parts = []
    for what, label in (("device", "device peak"), ("host", "host growth")):
        predicted, measured = memory.get(f"predicted_{what}_peak"), memory.get(f"measured_{what}_peak")
        if predicted is not None and measured is not None:
            parts.append(f"{label} {measured / 1e9:.2f} GB measured, {predicted / 1e9:.2f} GB predicted "
                         f"(x{measured / predicted:.2f})" if predicted else f"{label} {measured / 1e9:.2f} GB measured")
    return "; ".join(parts)


def _summary(result, final: Path, metrics: Path, plot_path: Optional[Path], eval_metrics: dict) -> str:
    losses = [x for x in result.losses if x is not None]
    head = sum(losses[:10]) / max(1, len(losses[:10]))
    tail = sum(losses[-10:]) / max(1, len(losses[-10:]))
    lines = [f"hift train: {result.steps} steps, {result.cycles} cycles of {result.num_groups} groups, "
             f"{result.precision}, {result.seconds:.1f} s; loss {head:.4f} (first 10 steps) -> {tail:.4f} (last 10)"]
    if eval_metrics:
        lines.append(f"  held out: {shown(eval_metrics)}")
    if result.memory.get("predicted_host_peak") is not None:
        lines.append("  memory: " + memory_claim(result.memory))
    lines.append(f"  model: {final}  metrics: {metrics}" + (f"  plot: {plot_path}" if plot_path else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    from hift import NonFiniteError
    from hift.batches import BatchError
    from hift.config import ConfigError
    from hift.groups import GroupingError

    try:
        run(argv)
    except (TrainError, ConfigError, BatchError, GroupingError, checkpoint.CheckpointError, NonFiniteError) as err:
        print(f"hift train: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
