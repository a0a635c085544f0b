"""BAdam (Luo et al. 2024): block coordinate descent with Adam; the `badam` package's BlockOptimizer.

One block trains at a time with a fresh Adam state (discarded at every switch) and an fp32
copy of the block's weights; the block switches every `switch_every` steps, top block first
("descending", the package default). The blocks here are hift's units (embeddings, each
transformer block, final norm, head), found the same way hift finds them, so that BAdam also
trains the embeddings and the head (the package's default blocks cover only the layers).
switch_every: the paper uses 50-100 on LLaMA-2-7B; a benchmark of a few dozen steps would then
train one block only, so by default it is steps // blocks (at least 1): every block trains
once within the run. Pass bench option switch_every=N to change it.
"""
from __future__ import annotations

import contextlib
import io
import warnings

import torch

from bench.methods.base import StepMethod, grads_bytes, optimizer_state_bytes, tensor_bytes
from hift.batches import compute_loss
from hift.groups import detect_units


class BAdam(StepMethod):
    name = "badam"
    paper_lr = 1e-5  # BAdam paper, LLaMA-2-7B / 3-8B instruction tuning
    lr_grid = (1e-5, 1e-4, 1e-3)
    note = "badam.BlockOptimizer over hift's units (all of them), descending, Adam state reset per switch"

    def setup(self, model, spec):
        from badam import BlockOptimizer

        units = detect_units(model, lambda: compute_loss(model, self.first_batch))
        blocks = [list(u.names) for u in units]
        steps = spec.options.get("total_steps", spec.max_steps)
        self.switch_every = int(spec.options.get("switch_every", max(1, steps // len(blocks))))
        base = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0, fused=True)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # "BAdam expects fp16/bf16 weights" on fp32 runs
            self.optimizer = BlockOptimizer(base, list(model.named_parameters()), block_prefix_list=blocks,
                                            switch_block_every=self.switch_every, switch_mode="descending",
                                            verbose=0)
        self.note = f"{self.note}; switch every {self.switch_every} steps"

    def step(self, batch):
        loss = self.loss(batch)
        loss.backward()
        active = [p for p in self.model.parameters() if p.grad is not None]
        self.grad_bytes = max(self.grad_bytes, grads_bytes(active))
        self.clip(active)
        with contextlib.redirect_stdout(io.StringIO()):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        masters = tensor_bytes(self.optimizer.param_idx2hp.values())
        self.state_bytes = max(self.state_bytes, optimizer_state_bytes(self.optimizer.base_optimizer) + masters)
        return loss.detach()
