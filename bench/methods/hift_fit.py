"""hift itself: hift.fit, one group per step, in its precision modes.

Options (bench spec "hift:group_size=2,order=bottom_up,offload=1"): group_size, order, offload,
prefetch, moment_dtype, lr_schedule (constant unless given, as for every other method) and
warmup_cycles. The precision is the run's (fp32, bf16 or fp16; bf16/fp16 keep fp32 masters). hift
casts the model itself after taking the fp32 masters, so this method does not cast it first.
"""
from __future__ import annotations

import hift
from bench.methods.base import Method


class _Stop(Exception):
    pass


class Hift(Method):
    name = "hift"
    paper_lr = 2e-5  # HiFT paper: the full fine-tuning learning rate
    lr_grid = (1e-5, 1e-4, 1e-3)
    note = "hift.fit, constant lr unless the spec names lr_schedule, group clipped to norm 1"

    def prepare_model(self, model, spec):
        if spec.grad_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        return model

    def train(self, model, batches, spec, on_step, device):
        model = self.prepare_model(model, spec)
        options = dict(spec.options)
        options.pop("total_steps", None)
        schedule = options.pop("lr_schedule", "constant")
        for key in ("group_size", "warmup_cycles"):
            if key in options:
                options[key] = int(options[key])
        for key in ("offload", "prefetch"):
            if key in options:
                options[key] = bool(int(options[key]))

        def step_done(event):
            self.state_bytes = _state_device_bytes(event.state)
            self.extra = {"group_state_bytes": [n * 4 for n in event.state.numels],
                          "offload": bool(event.state.offload), "num_groups": len(event.groups)}
            self.grad_bytes = max(g.numel for g in event.groups) * next(model.parameters()).element_size()
            if on_step(float(event.loss)):  # the loss fit records for the step
                raise _Stop

        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        try:
            self.result = hift.fit(model, batches, lr=spec.lr, max_steps=spec.max_steps,
                                   precision=spec.precision, max_grad_norm=spec.max_grad_norm,
                                   lr_schedule=schedule, seed=spec.seed, progress=False,
                                   log_every=1, on_step=step_done, **options)
        except _Stop:
            pass
        return model


def _state_device_bytes(state) -> int:
    """Optimizer-state bytes on the training device: every group's buffer without offload,
    the swapper's slots with it (its host buffers are host memory)."""
    if not state.offload:
        return sum(state.numels) * 4
    slots = getattr(state.swapper, "num_slots", lambda: 2)()
    return slots * max(state.numels) * 4
