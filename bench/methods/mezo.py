"""MeZO (Malladi et al. 2023): zeroth-order SGD with two forward passes and no backward.

No package exists; this follows the paper's Algorithm 1. Each step draws a seed s; z ~ N(0, I)
is regenerated from s parameter by parameter whenever it is needed, never stored:
    theta += eps*z; l+ = L(theta); theta -= 2*eps*z; l- = L(theta); theta += eps*z (restored)
    g = (l+ - l-) / (2*eps);  theta -= lr * g * z     (z regenerated from s once more)
The forward passes run without autograd and without dropout (model.eval()), as in the
paper's code, so that both see the same function. eps = 1e-3 as in the paper.
"""
from __future__ import annotations

import torch

from bench.methods.base import StepMethod


class MeZO(StepMethod):
    name = "mezo"
    paper_lr = 1e-6  # MeZO paper, RoBERTa-large / OPT full-parameter (1e-6 .. 1e-7)
    lr_grid = (1e-6, 1e-5, 1e-4)
    note = "SPSA with seed-regenerated z (implemented in bench/methods/mezo.py), eps 1e-3, no dropout"
    eps = 1e-3

    def setup(self, model, spec):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.generator_device = self.params[0].device
        self.draws = torch.Generator().manual_seed(spec.seed)

    def _z(self, p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.generator_device).manual_seed(seed)

    @torch.no_grad()
    def _perturb(self, seed: int, scale: float) -> None:
        generator = self._generator(seed)
        for p in self.params:
            p.add_(self._z(p, generator), alpha=scale)

    @torch.no_grad()
    def step(self, batch):
        seed = int(torch.randint(0, 2**31 - 1, (), generator=self.draws))
        was_training = self.model.training
        self.model.eval()
        self._perturb(seed, self.eps)
        loss_plus = self.loss(batch).float()
        self._perturb(seed, -2 * self.eps)
        loss_minus = self.loss(batch).float()
        self._perturb(seed, self.eps)
        projected_grad = float((loss_plus - loss_minus) / (2 * self.eps))
        generator = self._generator(seed)
        for p in self.params:
            p.add_(self._z(p, generator), alpha=-self.spec.lr * projected_grad)
        self.model.train(was_training)
        self.grad_bytes = max(p.numel() * p.element_size() for p in self.params)  # one z at a time
        return loss_plus
