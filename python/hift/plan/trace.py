"""Tracing: a causal LM built on the meta device from its config, and what autograd saves
for backward, unit by unit.

The model is built on the meta device (shapes, no storage). Its units and groups are found by
hift.groups exactly as fit() finds them (a forward on meta tensors). Activations are not
estimated from a formula: the forward runs on the meta device under
torch.autograd.graph.saved_tensors_hooks, and the storages autograd saves for backward are
added up, each attributed to the unit whose module was running. It does so twice: with every
weight trainable (each unit in its "trainable" mode), and with only the embeddings trainable
(every unit above in its "frozen" mode: its input needs a gradient, its weights do not, so a
frozen linear layer saves nothing). Attention is traced as a fused kernel (flash /
memory-efficient SDPA, as on a GPU and on the CPU): it saves q, k, v, its output and a per-row
log-sum-exp.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hift.precision import DTYPES  # the weights' dtype of a run, by its precision's name

# LLaMA-2 configs, written out (Touvron et al. 2023, the released config.json files).
LLAMA2 = {
    "llama-2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, intermediate_size=11008, vocab_size=32000,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama-2-13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, intermediate_size=13824, vocab_size=32000,
                        max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False),
}

# Newer models the planner knows by name (`hift plan --model`), from their released config.json.
MODELS = {
    **LLAMA2,
    # (the published table stays at 7B and 13B: LLAMA2 lists those; 70B is for --model)
    "llama-2-70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        intermediate_size=28672, vocab_size=32000, max_position_embeddings=4096,
                        rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama-3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       tie_word_embeddings=False),
}


def llama_config(name_or_dict):
    """A model config: a LLaMA-2 name of the planner's, a local model directory or config.json
    (any transformers family, read by AutoConfig: its model_type decides), or a dict of LLaMA
    fields."""
    from transformers import AutoConfig, LlamaConfig

    if isinstance(name_or_dict, str):
        if name_or_dict in MODELS:
            fields = dict(MODELS[name_or_dict])
            return AutoConfig.for_model(fields.pop("model_type", "llama"), **fields)
        path = Path(name_or_dict)
        directory = path if path.is_dir() else path.parent
        if not (directory / "config.json").is_file() or (path.is_file() and path.name != "config.json"):
            raise ValueError(f"{name_or_dict} is neither one of the planner's models ({', '.join(MODELS)}) nor a "
                             "model directory with a config.json (a save_pretrained directory) nor its config.json")
        return AutoConfig.from_pretrained(str(directory))
    return LlamaConfig(**name_or_dict)


def meta_model(config, precision: str = "fp32") -> nn.Module:
    """A causal LM from a transformers config, on the meta device, in the run's weight dtype."""
    from transformers import AutoModelForCausalLM

    if isinstance(config, (str, dict)):
        config = llama_config(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model.to(DTYPES[precision])


class _FusedAttention(torch.autograd.Function):
    """Stands in for SDPA while tracing: the saved tensors of a fused (flash) attention."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_sdpa(query, key, value, *args, enable_gqa=False, **kwargs):
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(repeat, dim=-3)
        value = value.repeat_interleave(repeat, dim=-3)
    return _FusedAttention.apply(query, key, value)


@dataclass
class UnitTrace:
    """Per unit (in forward order): its parameter count and the bytes autograd saves."""

    kinds: list[str]
    numels: list[int]
    largest_param: int  # numel of the largest single parameter
    unit_largest_param: list[int]  # numel of each unit's largest parameter
    trainable: list[int]  # saved bytes with every unit trainable
    frozen: list[int]  # saved bytes with the unit frozen, its input needing a gradient
    transient_trainable: list[int]
    transient_frozen: list[int]
    param_numels: list[list[int]] = None  # each unit's parameters' sizes (None: one per unit)
    # each unit's parameters' shapes: FSDP2 shards a parameter by its rows (None: each one row of
    # its size, which is how a flat parameter shards)
    param_shapes: list[list[tuple[int, ...]]] = None
    # each unit's output in bytes (its last module's: the head's is the logits); None: unknown (0)
    outputs: list[int] = None
    # what the loss saves (the ops after the last module's forward, counted in the top unit's
    # saved bytes): in all and its largest tensor (log_softmax's output); 0: not traced apart
    loss_saved: int = 0
    loss_largest: int = 0

    def __post_init__(self):
        if self.param_numels is None:
            self.param_numels = [[n] for n in self.numels]
        if self.param_shapes is None:
            self.param_shapes = [[(n,) for n in sizes] for sizes in self.param_numels]
        if self.outputs is None:
            self.outputs = [0] * len(self.numels)


@dataclass
class _Saved:
    """One traced forward: per unit the bytes saved for backward and its backward's transient;
    each unit's output; what the loss (the ops after the last module) saves, in all and largest."""

    per_unit: list[int]
    transient: list[int]
    outputs: list[int]
    loss_saved: int
    loss_largest: int


def _nbytes(output) -> int:
    """A module's output in bytes (a tuple's or a model output's first tensor)."""
    if isinstance(output, torch.Tensor):
        return output.untyped_storage().nbytes()
    items = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return next((_nbytes(x) for x in items if isinstance(x, torch.Tensor)), 0)


def _trace_saved(model, units, run, trainable_units: set[int]) -> _Saved:
    unit_of = {}
    for i, unit in enumerate(units):
        for p in unit.params:
            unit_of[id(p)] = i
    for i, unit in enumerate(units):
        for p in unit.params:
            p.requires_grad_(i in trainable_units)
    param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    current = [0]
    saved: dict[int, tuple[int, int, int]] = {}  # storage -> (unit, bytes, when)
    outputs = [0] * len(units)
    last_exit = [0]  # when the last module with weights returned: what is saved after is the loss's

    def enter(module, _inputs):
        own = list(module.parameters(recurse=False))
        if own and id(own[0]) in unit_of:
            current[0] = unit_of[id(own[0])]

    def leave(module, _inputs, output):
        outputs[current[0]] = _nbytes(output)  # the unit's last module's output is the unit's
        last_exit[0] = len(saved)

    def pack(t):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in param_storages and key not in saved:
            saved[key] = (current[0], storage.nbytes(), len(saved))
        return t

    with_weights = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    hooks = [m.register_forward_pre_hook(enter) for m in with_weights]
    hooks += [m.register_forward_hook(leave) for m in with_weights]
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _fused_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
        for h in hooks:
            h.remove()
    per_unit = [0] * len(units)
    largest = [0] * len(units)
    loss = [nbytes for _, nbytes, when in saved.values() if when >= last_exit[0]]
    for unit, nbytes, _ in saved.values():
        per_unit[unit] += nbytes
        largest[unit] = max(largest[unit], nbytes)
    # A unit's backward holds, besides what was saved, about three tensors the size of its
    # largest saved one: the gradient arriving for it, a temporary of its backward (softmax's
    # exp(output)), and the gradient it passes on.
    return _Saved(per_unit, [3 * x for x in largest], outputs, sum(loss), max(loss, default=0))


def trace_units(model: nn.Module, batch: int, seq: int, inputs=None) -> tuple[UnitTrace, list]:
    """The trace of a meta model on a batch of batch x seq token ids (a causal LM), or on
    `inputs` (any batch the model takes, its tensors on the meta device)."""
    from hift.batches import compute_loss
    from hift.groups import detect_units

    if inputs is None:
        ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
        inputs = {"input_ids": ids, "labels": ids}
    # (the config's use_cache stays as it is: with no cache transformers inspects position ids
    # for packed sequences, which needs values that meta tensors do not have)
    run = lambda: compute_loss(model, inputs)
    for p in model.parameters():
        p.requires_grad_(True)
    units = detect_units(model, run)
    trainable = _trace_saved(model, units, run, set(range(len(units))))
    frozen = _trace_saved(model, units, run, {0})
    for p in model.parameters():
        p.requires_grad_(True)
    trace = UnitTrace(kinds=[u.kind for u in units], numels=[u.numel for u in units],
                      largest_param=max(p.numel() for p in model.parameters()),
                      unit_largest_param=[max(p.numel() for p in u.params) for u in units],
                      param_numels=[[p.numel() for p in u.params] for u in units],
                      param_shapes=[[tuple(p.shape) for p in u.params] for u in units],
                      trainable=trainable.per_unit, frozen=frozen.per_unit,
                      transient_trainable=trainable.transient, transient_frozen=frozen.transient,
                      outputs=trainable.outputs, loss_saved=trainable.loss_saved,
                      loss_largest=trainable.loss_largest)
    return trace, units


def meta_twin(model: nn.Module) -> nn.Module:
    """A copy of any model with every parameter and buffer on the meta device: its structure and
    shapes, no storage (the copy shares nothing with the model)."""
    import copy

    memo = {}
    for t in [*model.parameters(), *model.buffers()]:
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def block_input_bytes(model: nn.Module, batch: int, seq: int, precision: str) -> int:
    """One block's input: what recompute_activations keeps of each frozen block above the group."""
    return batch * seq * model.config.hidden_size * DTYPES[precision].itemsize

