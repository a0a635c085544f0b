"""HiftAdamW in 🤗 Trainer and TRL's SFTTrainer, unmodified: one group per optimizer step,
gradient accumulation, the Trainer's clipping on the active group's gradients, a bf16 model,
checkpoints that resume exactly, a transformers scheduler sampled once per cycle."""
import copy

import pytest
import torch

import tiny_models as tm
from planted import RunsCodeWhenUnpickled
from hift import HiftAdamW

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import Trainer, TrainerCallback, TrainingArguments, get_linear_schedule_with_warmup  # noqa: E402


def samples(n, seed=3):
    return [{k: v[0] for k, v in b.items()} for b in tm.lm_batches(n, batch=1, seed=seed)]


def arguments(tmp_path, **overrides):
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=10, logging_steps=1,
                   save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                   dataloader_num_workers=0, max_grad_norm=1.0)
    options.update(overrides)
    return TrainingArguments(**options)


class Watch(TrainerCallback):
    """Per optimizer step: the parameters with a gradient before it, those it changed, the group
    it trained and the lr it used."""

    def __init__(self, model, opt):
        self.model, self.opt = model, opt
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        active = self.opt.active_group
        self.steps.append(dict(
            active={id(p) for p in self.opt.param_groups[active]["params"]},
            with_grad={id(p) for p in self.model.parameters() if p.grad is not None},
            grad_norm=float(torch.linalg.vector_norm(torch.stack(
                [p.grad.float().norm() for p in self.model.parameters() if p.grad is not None]))),
            before={id(p): p.detach().clone() for p in self.model.parameters()}))

    def on_optimizer_step(self, args, state, control, **kwargs):
        step = self.steps[-1]
        before = step.pop("before")
        step["changed"] = {id(p) for p in self.model.parameters() if not torch.equal(p, before[id(p)])}
        step["group"], step["lr"] = self.opt.last_step.group, self.opt.last_step.lr


def mean_loss(model, data):
    with torch.no_grad():
        return sum(float(model(**{k: v[None] for k, v in s.items()}).loss) for s in data) / len(data)


def test_trainer_trains_one_group_per_step_with_accumulation_and_clipping(tmp_path):
    model = tm.llama(layers=2)
    start = copy.deepcopy(model)
    data = samples(8)
    opt = HiftAdamW(model, lr=1e-2)
    watch = Watch(model, opt)
    # 15 optimizer steps of 2 micro-batches: 3 cycles over 5 groups; a tight clip norm so that
    # the Trainer's clipping acts
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=15, gradient_accumulation_steps=2,
                                                  max_grad_norm=0.05),
                      train_dataset=data, optimizers=(opt, None), callbacks=[watch])
    before = mean_loss(model, data)
    trainer.train()
    assert len(watch.steps) == 15
    assert [s["group"] for s in watch.steps] == [4, 3, 2, 1, 0] * 3  # top_down
    for i, step in enumerate(watch.steps):
        # the Trainer saw (and clipped) the active group's gradients alone: per-group clipping
        assert step["with_grad"] == step["active"], f"step {i}"
        assert step["grad_norm"] <= 0.05 * (1 + 1e-5), f"step {i}"
        assert step["changed"] == step["active"], f"step {i}"
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(logged) == 15 and max(logged) > 0.05  # the clip was needed
    for (name, p), q in zip(model.named_parameters(), start.parameters()):
        assert not torch.equal(p, q), f"{name} never moved"
    assert mean_loss(model, data) < before - 0.05
    opt.close()


def cycle_lrs_of_linear_warmup(base, k, cycles, warmup, total):
    """The lr of every step when each cycle of k steps holds the schedule's value at its start."""
    factor = get_linear_schedule_with_warmup(torch.optim.SGD([torch.zeros(1)], lr=base), warmup, total).lr_lambdas[0]
    return [base * factor(c * k) for c in range(cycles) for _ in range(k)]


def test_transformers_scheduler_is_held_for_each_cycle(tmp_path):
    """get_linear_schedule_with_warmup counts its warm-up and length in optimizer steps, as for
    any optimizer; hift trains each cycle at its value at the cycle's first step. 10 warm-up
    steps over 5 groups: cycle 0 at 0, cycle 1 at half the lr, cycle 2 at the full lr, then the
    decay to step 25."""
    model = tm.llama(layers=2)
    base, k = 1e-2, 5
    opt = HiftAdamW(model, lr=base)
    scheduler = get_linear_schedule_with_warmup(opt, num_warmup_steps=10, num_training_steps=25)
    watch = Watch(model, opt)
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=25), train_dataset=samples(8),
                      optimizers=(opt, scheduler), callbacks=[watch])
    trainer.train()
    lrs = [s["lr"] for s in watch.steps]
    assert lrs == cycle_lrs_of_linear_warmup(base, k, 5, 10, 25)
    assert [lrs[c * k] / base for c in range(5)] == pytest.approx([0, 0.5, 1, 2 / 3, 1 / 3])
    # the Trainer logs the scheduler's own value, step by step
    assert trainer.state.log_history[1]["learning_rate"] == pytest.approx(base * 0.1)
    opt.close()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trainer_resumes_from_checkpoint_exactly(tmp_path, precision):
    """Killed after checkpoint-7 (mid-cycle) and resumed with resume_from_checkpoint: the same
    losses and weights, bit for bit, as a run that went straight on."""
    def run(output, resume=None):
        model = tm.llama(layers=2)
        if precision == "bf16":
            model.to(torch.bfloat16)
        opt = HiftAdamW(model, lr=1e-2, order="random", seed=5, moment_dtype="bf16" if precision == "bf16" else "fp32")
        scheduler = get_linear_schedule_with_warmup(opt, num_warmup_steps=4, num_training_steps=12)
        trainer = Trainer(model=model, args=arguments(output, max_steps=12, save_strategy="steps", save_steps=7,
                                                      bf16=precision == "bf16", gradient_accumulation_steps=2),
                          train_dataset=samples(10), optimizers=(opt, scheduler))
        trainer.train(resume_from_checkpoint=resume)
        losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
        state = opt.state_dict()["hift"]
        opt.close()
        return model, losses, state

    straight, losses, state = run(tmp_path / "a")
    resumed, resumed_losses, resumed_state = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-7"))
    assert set(losses) == set(range(1, 13))
    assert resumed_losses == losses  # steps 1-7 from the checkpoint's history, 8-12 trained again
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert p.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        assert torch.equal(p, q), name
    assert all(torch.equal(a, b) for a, b in zip(state["chunks"], resumed_state["chunks"]))
    assert state["order"] == resumed_state["order"] and state["steps"] == resumed_state["steps"]


def tiny_tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary, built here (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, tm.VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def test_sft_trainer_trains_with_hift(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(3, tm.VOCAB, (int(n),), generator=g))
             for n in torch.randint(4, 12, (12,), generator=g)]
    data = datasets.Dataset.from_dict({"text": texts})
    model = tm.llama(layers=2)
    start = copy.deepcopy(model)
    opt = HiftAdamW(model, lr=1e-2, group_size=2)
    watch = Watch(model, opt)
    config = trl.SFTConfig(output_dir=str(tmp_path), max_steps=9, per_device_train_batch_size=4, logging_steps=1,
                           save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, max_length=16,
                           dataloader_num_workers=0)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tiny_tokenizer(),
                             optimizers=(opt, None), callbacks=[watch])
    trainer.train()
    assert [s["group"] for s in watch.steps] == [2, 1, 0] * 3
    assert all(s["changed"] == s["active"] == s["with_grad"] for s in watch.steps)
    for (name, p), q in zip(model.named_parameters(), start.parameters()):
        assert not torch.equal(p, q), f"{name} never moved"
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-3:]) < sum(losses[:3])
    opt.close()



def test_a_pickled_object_planted_in_optimizer_pt_is_refused_before_it_runs(tmp_path):
    """A Trainer's optimizer.pt holds HiftAdamW.state_dict(): plain data (a MethodState and the
    chunks' bytes) that the Trainer loads with weights_only=True, so an object planted in it is
    refused on resume before it runs."""
    import pickle

    def trainer(output):
        opt = HiftAdamW(tm.llama(layers=2), lr=1e-2)
        return Trainer(model=opt.model, args=arguments(output, max_steps=4, save_strategy="steps", save_steps=2),
                       train_dataset=samples(6), optimizers=(opt, None)), opt

    first, opt = trainer(tmp_path)
    first.train()
    opt.close()
    path = tmp_path / "checkpoint-2" / "optimizer.pt"
    state = torch.load(path, weights_only=True)
    marker = tmp_path / "ran"
    state["hift"]["planted"] = RunsCodeWhenUnpickled(marker)
    torch.save(state, path)
    second, opt = trainer(tmp_path)
    with pytest.raises(pickle.UnpicklingError):
        second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert not marker.exists()
    opt.close()
