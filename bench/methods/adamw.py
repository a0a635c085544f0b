"""Full fine-tuning with torch.optim.AdamW (fused=True: one multi-tensor kernel on CPU and GPU)."""
from __future__ import annotations

import torch

from bench.methods.base import StepMethod, grads_bytes, optimizer_state_bytes


class AdamW(StepMethod):
    name = "adamw"
    paper_lr = 2e-5  # the usual full fine-tuning value (RoBERTa/LLaMA fine-tuning recipes)
    lr_grid = (1e-5, 1e-4, 1e-3)
    note = "torch.optim.AdamW(fused=True), grads clipped to norm 1"

    def setup(self, model, spec):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=spec.lr, weight_decay=0.0, fused=True)

    def step(self, batch):
        loss = self.loss(batch)
        loss.backward()
        self.grad_bytes = max(self.grad_bytes, grads_bytes(self.params))
        self.clip(self.params)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state_bytes = optimizer_state_bytes(self.optimizer)
        return loss.detach()
