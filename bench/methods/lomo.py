"""LOMO (Lv et al. 2023): plain SGD fused into backward; lomo-optim's Lomo.

Each parameter's gradient is applied and freed as soon as the next one is computed (a hook
per parameter), so at most about one parameter's gradient is alive and there is no optimizer
state. Lomo clips only through a second backward pass (grad_norm then fused_backward); this
benchmark runs it without clipping, its fastest mode.
"""
from __future__ import annotations

from bench.methods.base import StepMethod


class Lomo(StepMethod):
    name = "lomo"
    paper_lr = 1e-2  # LOMO paper, SuperGLUE fine-tuning of LLaMA (1e-2 .. 3e-2)
    lr_grid = (1e-3, 1e-2, 1e-1)
    note = "lomo_optim.Lomo, fused_backward, no clipping (it needs a second backward)"

    def setup(self, model, spec):
        from lomo_optim import Lomo as LomoOptimizer

        self.optimizer = LomoOptimizer(model, lr=spec.lr)
        self.grad_bytes = max(p.numel() * p.element_size() for p in model.parameters()) * 2

    def step(self, batch):
        loss = self.loss(batch)
        self.optimizer.fused_backward(loss, self.spec.lr)
        return loss.detach()
