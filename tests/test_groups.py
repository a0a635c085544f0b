"""Units and groups found from the module structure, for every supported family."""
import pytest
import torch
from torch import nn

import tiny_models as tm
from hift.groups import GroupingError, detect_units, make_groups, units_from_user

LAYERS = 2
BLOCK = [f"block{i}" for i in range(LAYERS)]

# family -> (factory, batches, expected units as (kind, names of the non-block units))
FAMILIES = {
    "llama": (tm.llama, tm.lm_batches, [("embeddings", ["model.embed_tokens.weight"]), *BLOCK,
              ("norm", ["model.norm.weight"]), ("head", ["lm_head.weight"])]),
    "mistral": (tm.mistral, tm.lm_batches, [("embeddings", ["model.embed_tokens.weight"]), *BLOCK,
                ("norm", ["model.norm.weight"]), ("head", ["lm_head.weight"])]),
    # tied: the LM head is the embedding matrix, so it stays in the embeddings unit
    "qwen2": (tm.qwen2, tm.lm_batches, [("embeddings", ["model.embed_tokens.weight"]), *BLOCK,
              ("norm", ["model.norm.weight"])]),
    "gpt2": (tm.gpt2, tm.lm_batches, [("embeddings", ["transformer.wte.weight", "transformer.wpe.weight"]),
             *BLOCK, ("norm", ["transformer.ln_f.weight", "transformer.ln_f.bias"])]),
    "gpt_neox": (tm.gpt_neox, tm.lm_batches, [("embeddings", ["gpt_neox.embed_in.weight"]), *BLOCK,
                 ("norm", ["gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias"]),
                 ("head", ["lm_head.weight"])]),
    # OPT registers its final norm before its layers: only the forward order places it right
    "opt": (tm.opt, tm.lm_batches, [("embeddings", ["model.decoder.embed_tokens.weight",
                                                    "model.decoder.embed_positions.weight"]),
            *BLOCK, ("norm", ["model.decoder.final_layer_norm.weight", "model.decoder.final_layer_norm.bias"])]),
    "bert": (tm.bert, tm.cls_batches, [("embeddings", [f"bert.embeddings.{n}" for n in (
        "word_embeddings.weight", "token_type_embeddings.weight", "position_embeddings.weight",
        "LayerNorm.weight", "LayerNorm.bias")]), *BLOCK,
        ("head", ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"])]),
    "roberta": (tm.roberta, tm.cls_batches, [("embeddings", [f"roberta.embeddings.{n}" for n in (
        "word_embeddings.weight", "token_type_embeddings.weight", "position_embeddings.weight",
        "LayerNorm.weight", "LayerNorm.bias")]), *BLOCK,
        ("head", ["classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight",
                  "classifier.out_proj.bias"])]),
}


def detect(model, batches):
    batch = batches(1)[0]
    return detect_units(model, lambda: model(**batch))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_units_of_each_family(family):
    factory, batches, expected = FAMILIES[family]
    model = factory(layers=LAYERS)
    units = detect(model, batches)
    assert len(units) == len(expected)
    block_list = next(m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == LAYERS)
    for unit, want in zip(units, expected):
        if isinstance(want, str):  # a block: exactly that block's parameters
            index = int(want[len("block"):])
            assert unit.kind == "block"
            assert {id(p) for p in unit.params} == {id(p) for p in block_list[index].parameters()}
        else:
            assert (unit.kind, unit.names) == want
    # every trainable parameter lands in exactly one unit
    ids = [id(p) for u in units for p in u.params]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "opt"])
def test_tied_head_shares_the_embeddings_group(family):
    factory, batches, _ = FAMILIES[family]
    model = factory(layers=LAYERS)
    units = detect(model, batches)
    head = model.get_output_embeddings().weight
    groups = make_groups(units, 1)
    holders = [g.index for g in groups if any(p is head for p in g.params)]
    assert holders == [0]
    assert model.get_input_embeddings().weight is head


@pytest.mark.parametrize("group_size,expected_sizes", [(1, [1] * 6), (2, [2, 2, 2]), (4, [4, 2]), (6, [6])])
def test_group_size_sets_k_and_last_group_takes_the_rest(group_size, expected_sizes):
    model = tm.llama(layers=3)
    units = detect(model, tm.lm_batches)
    groups = make_groups(units, group_size)
    assert [len(g.units) for g in groups] == expected_sizes
    assert [u for g in groups for u in g.units] == units


def test_group_size_out_of_range_is_a_clear_error():
    units = detect(tm.llama(layers=3), tm.lm_batches)
    with pytest.raises(GroupingError, match="between 1 and 6"):
        make_groups(units, 7)


def test_model_without_blocks_asks_for_units():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(GroupingError, match="units="):
        detect_units(model, lambda: model(torch.randn(2, 4)).sum())


def test_user_units_must_cover_every_trainable_parameter():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    units = units_from_user(model, [model[0], model[1]])
    assert [len(u.params) for u in units] == [2, 2]
    with pytest.raises(GroupingError, match="leave 2 trainable"):
        units_from_user(model, [model[0]])


def test_peft_model_groups_only_its_adapters():
    peft = pytest.importorskip("peft")
    model = tm.llama(layers=2)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    wrapped = peft.get_peft_model(model, config)
    units = detect(wrapped, tm.lm_batches)
    trainable = {id(p) for p in wrapped.parameters() if p.requires_grad}
    assert [u.kind for u in units] == ["block", "block"]
    assert {id(p) for u in units for p in u.params} == trainable
    assert all("lora_" in n for u in units for n in u.names)
