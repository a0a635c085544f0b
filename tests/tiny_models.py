"""Small transformers models (random weights, built from configs) and batches for them."""
from __future__ import annotations

import torch

VOCAB = 61  # odd on purpose


def _common(layers: int):
    return dict(vocab_size=VOCAB, hidden_size=24, num_attention_heads=2, num_hidden_layers=layers)


def llama(layers=3, tie=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**_common(layers), intermediate_size=40, num_key_value_heads=1,
                                        tie_word_embeddings=tie, max_position_embeddings=64))


def mistral(layers=2):
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**_common(layers), intermediate_size=40, num_key_value_heads=1,
                                            max_position_embeddings=64))


def qwen2(layers=2):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**_common(layers), intermediate_size=40, num_key_value_heads=1,
                                        max_position_embeddings=64, tie_word_embeddings=True))


def gpt2(layers=2):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=24, n_head=2, n_layer=layers, n_positions=64))


def gpt_neox(layers=2):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(**_common(layers), intermediate_size=40, max_position_embeddings=64))


def opt(layers=2):
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=24, ffn_dim=40, num_hidden_layers=layers,
                                    num_attention_heads=2, word_embed_proj_dim=24, max_position_embeddings=64))


def bert(layers=2, num_labels=3):
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(**_common(layers), intermediate_size=40,
                                                    max_position_embeddings=64, num_labels=num_labels))


def roberta(layers=2, num_labels=3):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    return RobertaForSequenceClassification(RobertaConfig(**_common(layers), intermediate_size=40,
                                                          max_position_embeddings=70, num_labels=num_labels))


def t5(layers=2, seed=0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=24, d_kv=12, d_ff=40, num_heads=2,
                                               num_layers=layers, num_decoder_layers=layers,
                                               pad_token_id=0, decoder_start_token_id=0))


def bart(layers=2, seed=0):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    return BartForConditionalGeneration(BartConfig(
        vocab_size=VOCAB, d_model=24, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=40, decoder_ffn_dim=40, max_position_embeddings=64,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2))


def lm_batches(n, batch=2, seq=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def cls_batches(n, batch=2, seq=9, num_labels=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "labels": torch.randint(0, num_labels, (batch,), generator=g)})
    return out


def seq2seq_batches(n, batch=2, seq=9, target_seq=7, seed=1):
    """input_ids and labels of different lengths, as in translation or summarization."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "labels": torch.randint(3, VOCAB, (batch, target_seq), generator=g)})
    return out
