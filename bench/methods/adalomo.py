"""AdaLomo (Lv et al. 2023): LOMO with Adafactor-style factored second moments; lomo-optim's AdaLomo.

AdaLomo creates its state with `.cuda()`. On a CPU this file runs it through a small adapter:
while the optimizer is constructed, Tensor.cuda returns the tensor unchanged, so the state is
made on the CPU; nothing else in AdaLomo's arithmetic is changed. On a GPU it runs as shipped.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from bench.methods.base import StepMethod, tensor_bytes


@contextmanager
def state_on_model_device(device: torch.device):
    if device.type == "cuda":
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


class AdaLomo(StepMethod):
    name = "adalomo"
    paper_lr = 5e-4  # AdaLomo paper, instruction tuning of LLaMA (5e-4)
    lr_grid = (1e-4, 1e-3, 1e-2)
    note = "lomo_optim.AdaLomo; on the CPU its .cuda() state is made on the CPU by an adapter"

    def setup(self, model, spec):
        from lomo_optim import AdaLomo as AdaLomoOptimizer

        device = next(model.parameters()).device
        with state_on_model_device(device):
            self.optimizer = AdaLomoOptimizer(model, lr=spec.lr)
        self.state_bytes = tensor_bytes([*self.optimizer.exp_avg_sq.values(),
                                         *self.optimizer.exp_avg_sq_row.values(),
                                         *self.optimizer.exp_avg_sq_col.values()])
        self.grad_bytes = max(p.numel() * p.element_size() for p in model.parameters()) * 2

    def step(self, batch):
        loss = self.loss(batch)
        self.optimizer.fused_backward(loss, self.spec.lr)
        return loss.detach()
