"""LoRA (Hu et al. 2021) through peft: rank-8 adapters on every linear layer, AdamW on them.

A classifier keeps its new head trainable (peft's SEQ_CLS task saves it); a causal LM trains
the adapters only. alpha 16, no dropout.
"""
from __future__ import annotations

from bench.methods.adamw import AdamW


class LoRA(AdamW):
    """AdamW's setup and step, on the adapters that prepare_model leaves trainable."""

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
