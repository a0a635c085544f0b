"""🤗 Trainer + HiftAdamW resumed as a user meets it: a run SIGKILLed right after it saved
checkpoint-7 (mid-cycle) and resumed with resume_from_checkpoint in a fresh process logs the same
losses and ends with the same weights and optimizer state, bit for bit, as a run that went
straight on. The Trainer shuffles with its own sampler; nothing is shared between the processes
but the checkpoint (and, for the disk store, the state_dir)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

TESTS = Path(__file__).parent

# argv: case, mode (straight | kill | resume), output_dir, out prefix
RUN = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    from safetensors.torch import save_file
    from transformers import Trainer, TrainerCallback, TrainingArguments, get_linear_schedule_with_warmup
    import tiny_models as tm
    from hift import HiftAdamW

    case, mode, output_dir, out = sys.argv[1:]
    bf16 = case != "fp32"
    state = dict(moment_dtype="int8", state_store="disk", state_dir=output_dir + "-state") if case == "bf16-int8-disk" else {}

    class KillAfterSave(TrainerCallback):
        trained = []  # the steps this process ran

        def on_step_end(self, args, st, control, **kwargs):
            self.trained.append(st.global_step)

        def on_save(self, args, st, control, **kwargs):  # called once checkpoint-N is written
            if mode == "kill" and st.global_step == 7:
                os.kill(os.getpid(), signal.SIGKILL)

    torch.manual_seed(1234)
    samples = [{k: v[0] for k, v in b.items()} for b in tm.lm_batches(10, batch=1, seed=3)]
    model = tm.llama(layers=2)
    for layer in model.model.layers:  # dropout draws from the RNG state the checkpoint restores
        layer.self_attn.attention_dropout = 0.1
    if bf16:
        model.to(torch.bfloat16)
    opt = HiftAdamW(model, lr=1e-2, order="random", seed=5, **state)
    scheduler = get_linear_schedule_with_warmup(opt, num_warmup_steps=4, num_training_steps=12)
    args = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=2, max_steps=12,
                             gradient_accumulation_steps=2, logging_steps=1, save_strategy="steps",
                             save_steps=7, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                             dataloader_num_workers=0, max_grad_norm=1.0, bf16=bf16)
    trainer = Trainer(model=model, args=args, train_dataset=samples, optimizers=(opt, scheduler),
                      callbacks=[KillAfterSave()])
    trainer.train(resume_from_checkpoint=output_dir + "/checkpoint-7" if mode == "resume" else None)
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    hift_state = opt.state_dict()["hift"]
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out + ".safetensors")
    save_file({f"chunk{i}": c.contiguous() for i, c in enumerate(hift_state["chunks"])}, out + ".state.safetensors")
    with open(out + ".json", "w") as f:
        json.dump(dict(trained=KillAfterSave.trained, losses=losses, order=hift_state["order"], steps=hift_state["steps"],
                       cycle_lrs=hift_state["cycle_lrs"]), f, default=lambda t: t.tolist())
    opt.close()
""")


def start(tmp_path, case, mode, run_dir):
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    out = str(tmp_path / mode)
    args = [case, mode, str(tmp_path / run_dir), out]
    return subprocess.Popen([sys.executable, "-c", RUN, *args], env=env, stderr=subprocess.PIPE, text=True), out


def finished(child) -> None:
    _, err = child.communicate(timeout=600)
    assert child.returncode == 0, err[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["fp32", "bf16-int8-disk"])
def test_trainer_killed_after_a_checkpoint_resumes_in_a_fresh_process_exactly(tmp_path, case):
    killed, _ = start(tmp_path, case, "kill", "run")
    _, err = killed.communicate(timeout=600)
    assert killed.returncode == -signal.SIGKILL, err[-3000:]
    assert (tmp_path / "run" / "checkpoint-7").is_dir()
    resumed, resumed_out = start(tmp_path, case, "resume", "run")
    finished(resumed)
    straight, straight_out = start(tmp_path, case, "straight", "straight")
    finished(straight)

    ran = json.loads(Path(straight_out + ".json").read_text())
    again = json.loads(Path(resumed_out + ".json").read_text())
    assert sorted(map(int, ran["losses"])) == list(range(1, 13))
    assert ran.pop("trained") == list(range(1, 13)) and again.pop("trained") == list(range(8, 13))
    assert again == ran  # losses of steps 1-7 from the checkpoint's history, 8-12 trained again
    for suffix in (".safetensors", ".state.safetensors"):
        expected, got = load_file(straight_out + suffix), load_file(resumed_out + suffix)
        assert expected.keys() == got.keys()
        for name, tensor in expected.items():
            assert torch.equal(tensor, got[name]), (suffix, name)
