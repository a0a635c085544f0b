"""LoRA (Hu et al. 2021) through peft: rank-8 adapters on every linear layer, AdamW on them.

A classifier keeps its new head trainable (peft's SEQ_CLS task saves it); a causal LM trains
the adapters only. alpha 16, no dropout.
"""
from __future__ import annotations

import torch

from bench.methods.base import StepMethod, grads_bytes, optimizer_state_bytes


class LoRA(StepMethod):
    name = "lora"
    paper_lr = 2e-4  # LoRA / QLoRA recipes (RoBERTa 4e-4 .. 5e-4, LLaMA 2e-4)
    lr_grid = (1e-4, 1e-3, 1e-2)
    note = "peft LoRA r=8, alpha=16, all linear layers, AdamW(fused) on the adapters"
    rank = 8

    def prepare_model(self, model, spec):
        from peft import LoraConfig, TaskType, get_peft_model

        model = super().prepare_model(model, spec)
        kind = type(model).__name__
        task = (TaskType.SEQ_CLS if kind.endswith("ForSequenceClassification") else
                TaskType.CAUSAL_LM if kind.endswith("ForCausalLM") else None)
        config = LoraConfig(r=int(spec.options.get("r", self.rank)), lora_alpha=16, lora_dropout=0.0,
                            target_modules="all-linear", task_type=task)
        return get_peft_model(model, config)

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
