"""Units and groups found from the module structure, for every supported family (one block
list or several), and units the loss never reaches refused before training."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import hift
import tiny_models as tm
from hift.batches import probe
from hift.groups import GroupingError, detect_units, make_groups, units_from_user
from hift.recompute import recompute_blocks

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


def test_a_model_with_nothing_to_train_is_refused_in_words_by_every_entry():
    model = tm.llama(layers=2).requires_grad_(False)
    batches = tm.lm_batches(2)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    words = "no trainable parameters"
    with pytest.raises(GroupingError, match=words):
        detect_units(model, lambda: model(**batches[0]))
    with pytest.raises(GroupingError, match=words):
        hift.HiftAdamW(model, example_batch=batches[0])
    with pytest.raises(GroupingError, match=words):
        hift.fit(model, batches, max_steps=1, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())


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


# ------------------------------------------------------------------ several block lists


class VisionBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class DecoderBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.gate = nn.Linear(width, 2 * width, bias=False)
        self.up = nn.Linear(width, 2 * width, bias=False)
        self.down = nn.Linear(2 * width, width, bias=False)

    def forward(self, x):
        # a causal running mean stands in for attention: it lets the text see the image
        positions = torch.arange(1, x.shape[1] + 1, dtype=x.dtype, device=x.device)
        h = self.norm(x).cumsum(dim=1) / positions[:, None]
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class VisionTower(nn.Module):
    def __init__(self, patch, width, depth):
        super().__init__()
        self.patch = nn.Linear(patch, width)
        self.blocks = nn.ModuleList(VisionBlock(width) for _ in range(depth))
        self.post_norm = nn.LayerNorm(width)

    def forward(self, patches):
        x = self.patch(patches)
        for block in self.blocks:
            x = block(x)
        return self.post_norm(x)


class LanguageModel(nn.Module):
    def __init__(self, width, depth):
        super().__init__()
        self.embed = nn.Embedding(tm.VOCAB, width)
        self.blocks = nn.ModuleList(DecoderBlock(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, tm.VOCAB)

    def forward(self, prefix, tokens, targets):
        h = torch.cat([prefix, self.embed(tokens)], dim=1)
        for block in self.blocks:
            h = block(h)
        logits = self.head(self.norm(h[:, prefix.shape[1]:]))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class TwoTower(nn.Module):
    """A LLaVA-like model: a vision tower, a projector, then a language model whose blocks are
    of another class. The language model is registered first, so only the forward order can
    put the vision tower's blocks before its blocks."""

    def __init__(self, patch=12, vision_width=20, width=24, vision_depth=2, depth=3):
        super().__init__()
        self.language_model = LanguageModel(width, depth)
        self.vision = VisionTower(patch, vision_width, vision_depth)
        self.projector = nn.Linear(vision_width, width)

    def forward(self, patches, tokens, targets):
        return self.language_model(self.projector(self.vision(patches)), tokens, targets)


def two_tower(layers=2):
    torch.manual_seed(0)
    return TwoTower(vision_depth=layers, depth=layers + 1)


def two_tower_batches(n, batch=2, patches=5, seq=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, patches, 12, generator=g), torch.randint(0, tm.VOCAB, (batch, seq), generator=g),
             torch.randint(0, tm.VOCAB, (batch, seq), generator=g)) for _ in range(n)]


def call(model, batch):
    return model(**batch) if isinstance(batch, dict) else model(*batch)


# family -> (factory, batches, its block lists in forward order, expected units as in FAMILIES,
# where each "blockN" is the next block of those lists)
TOWERS = {
    # tied: the LM head is the shared embedding
    "t5": (tm.t5, tm.seq2seq_batches, lambda m: [m.encoder.block, m.decoder.block],
           [("embeddings", ["shared.weight"]), *BLOCK, ("norm", ["encoder.final_layer_norm.weight"]),
            *BLOCK, ("norm", ["decoder.final_layer_norm.weight"])]),
    "bart": (tm.bart, tm.seq2seq_batches, lambda m: [m.model.encoder.layers, m.model.decoder.layers],
             [("embeddings", ["model.shared.weight", "model.encoder.embed_positions.weight",
                              "model.encoder.layernorm_embedding.weight", "model.encoder.layernorm_embedding.bias"]),
              *BLOCK,
              ("embeddings", ["model.decoder.embed_positions.weight", "model.decoder.layernorm_embedding.weight",
                              "model.decoder.layernorm_embedding.bias"]),
              *BLOCK]),
    "two_tower": (two_tower, two_tower_batches, lambda m: [m.vision.blocks, m.language_model.blocks],
                  [("embeddings", ["vision.patch.weight", "vision.patch.bias"]), *BLOCK,
                   ("norm", ["vision.post_norm.weight", "vision.post_norm.bias"]),
                   ("embeddings", ["projector.weight", "projector.bias", "language_model.embed.weight"]),
                   *[f"block{i}" for i in range(3)],
                   ("norm", ["language_model.norm.weight", "language_model.norm.bias"]),
                   ("head", ["language_model.head.weight", "language_model.head.bias"])]),
}


def detect_towers(family):
    factory, batches, block_lists, expected = TOWERS[family]
    model = factory(layers=LAYERS)
    batch = batches(1)[0]
    return model, detect_units(model, lambda: call(model, batch)), block_lists(model), expected


@pytest.mark.parametrize("family", sorted(TOWERS))
def test_every_block_list_is_cut_into_blocks_in_forward_order(family):
    model, units, block_lists, expected = detect_towers(family)
    assert len(units) == len(expected)
    # each list's blocks in order, the lists in the order the forward uses them
    blocks = iter(block for blocks in block_lists for block in blocks)
    for unit, want in zip(units, expected):
        if isinstance(want, str):
            assert unit.kind == "block"
            assert {id(p) for p in unit.params} == {id(p) for p in next(blocks).parameters()}
        else:
            assert (unit.kind, unit.names) == want
    ids = [id(p) for u in units for p in u.params]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("family", sorted(TOWERS))
def test_no_unit_outgrows_the_largest_block_or_the_embeddings(family):
    model, units, block_lists, expected = detect_towers(family)
    params = dict(model.named_parameters())
    embeddings = sum(params[n].numel() for n in expected[0][1])
    largest_block = max(sum(p.numel() for p in block.parameters()) for blocks in block_lists for block in blocks)
    assert max(u.numel for u in units) <= max(largest_block, embeddings)


@pytest.mark.parametrize("family", sorted(TOWERS))
def test_one_cycle_moves_every_unit(family):
    model, units, _, _ = detect_towers(family)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    batches = TOWERS[family][1](len(units), seed=3)
    hift.fit(model, batches, max_steps=len(units), lr=1e-2, progress=False, max_grad_norm=None, order="bottom_up")
    moved = [any(not torch.equal(before[id(p)], p) for p in u.params) for u in units]
    assert moved == [True] * len(units)


def test_recompute_wraps_the_blocks_of_every_block_list():
    model = two_tower()
    blocks = [*model.vision.blocks, *model.language_model.blocks]
    with recompute_blocks(model):
        assert all("forward" in vars(block) for block in blocks)
    assert all("forward" not in vars(block) for block in blocks)


def test_experts_inside_a_block_are_not_blocks():
    class MoEBlock(nn.Module):
        def __init__(self, width=8, experts=3):
            super().__init__()
            self.router = nn.Linear(width, experts)
            self.experts = nn.ModuleList(nn.Linear(width, width) for _ in range(experts))

        def forward(self, x):
            weights = self.router(x).softmax(-1)
            return x + sum(weights[..., i:i + 1] * e(x) for i, e in enumerate(self.experts))

    class MoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 8)
            self.blocks = nn.ModuleList(MoEBlock() for _ in range(2))
            self.head = nn.Linear(8, 1)

        def forward(self, x):
            x = self.embed(x)
            for block in self.blocks:
                x = block(x)
            return self.head(x).mean()

    model = MoE()
    units = detect_units(model, lambda: model(torch.randn(3, 4)))
    assert [u.kind for u in units] == ["embeddings", "block", "block", "head"]


# ------------------------------------------------------------ units the loss never reaches


class TiedLM(nn.Module):
    """Embeddings, blocks and a final norm; the logits reuse the embedding matrix, or go through
    a head when `head` is set. `unused`, registered after the blocks, is a head the forward never
    calls (a value head left from another task)."""

    def __init__(self, head=False, vocab=37, width=16, depth=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab) if head else None
        self.unused = nn.Linear(width, 1)

    def forward(self, tokens, targets):
        h = self.embed(tokens)
        for block in self.blocks:
            h = h + block(h)
        h = self.norm(h)
        logits = self.head(h) if self.head is not None else F.linear(h, self.embed.weight)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def tied_lm_batches(n, vocab=37, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (3, 5), generator=g), torch.randint(0, vocab, (3, 5), generator=g))
            for _ in range(n)]


def assert_fit_refuses_before_training(model, match, **options):
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(GroupingError, match=match):
        hift.fit(model, tied_lm_batches(8), max_steps=8, progress=False, order="bottom_up", **options)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_user_unit_the_loss_never_reaches_is_named_before_training():
    torch.manual_seed(0)
    model = TiedLM(head=True)
    units = [model.embed, *model.blocks, model.norm, model.head, model.unused]
    assert_fit_refuses_before_training(model, r"units\[5\].*unused\.weight.*requires_grad_\(False\)", units=units)


def test_a_leftover_unit_the_loss_never_reaches_is_named_before_training():
    torch.manual_seed(0)
    model = TiedLM(head=False)  # so the leftover `unused` makes a head unit of its own
    assert_fit_refuses_before_training(model, r"head \(number 4 of 5.*unused\.weight, unused\.bias\).*requires_grad_\(False\)")


def test_an_unreached_parameter_beside_reached_ones_trains_the_rest():
    torch.manual_seed(0)
    model = TiedLM(head=True)  # `unused` joins the head unit
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hift.fit(model, tied_lm_batches(5), max_steps=5, lr=1e-2, progress=False, order="bottom_up")
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == set(before) - {"unused.weight", "unused.bias"}


def test_probe_reads_the_reached_parameters_without_writing_grads():
    torch.manual_seed(0)
    model = TiedLM(head=True)
    reached = probe(model, tied_lm_batches(1)[0])
    assert reached == {id(p) for n, p in model.named_parameters() if not n.startswith("unused.")}
    assert all(p.grad is None for p in model.parameters())


def test_probe_does_not_guess_through_a_reentrant_checkpoint():
    class Checkpointed(TiedLM):
        def forward(self, tokens, targets):
            h = self.embed(tokens)
            for block in self.blocks:
                h = h + checkpoint(block, h, use_reentrant=True)
            return F.cross_entropy(F.linear(self.norm(h), self.embed.weight).flatten(0, 1), targets.flatten())

    model = Checkpointed()
    assert probe(model, tied_lm_batches(1)[0]) is None
