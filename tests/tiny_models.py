"""Tiny models that the tests build and save, shaped like the real ones, so that the bridges load
them back through the same `from_pretrained` / open_clip paths a user's real checkpoint takes."""

import json
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

LLM_FAMILIES = ["opt", "gpt2", "llama", "t5"]

CORPUS = [
    "a cat sits on the mat",
    "two dogs play in the park",
    "a photo of a small red house",
    "the man rides a horse on the beach",
    "Question: what is in the picture? Short answer: a red ball",
    "a woman holds an umbrella in the rain",
    "a plate of food on a wooden table",
] * 4

# --- tiny tokenizers, shaped like the real ones ---------------------------------------------------


def byte_level_bpe(special_tokens: list[str]) -> Tokenizer:
    """GPT-2's tokenizer family (also OPT's): byte-level BPE, word tokens carry their space as "Ġ"."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def opt_tokenizer() -> PreTrainedTokenizerFast:
    # the real OPT tokenizer: GPT-2 BPE with <s> <pad> </s> <unk> first, and </s> as BOS and EOS
    tok = byte_level_bpe(["<s>", "<pad>", "</s>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    # GPT-2: one special token for everything, no BOS added, no pad token
    tok = byte_level_bpe(["<|endoftext|>"])
    special = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special, eos_token=special, unk_token=special)


def sentencepiece_like(model: str, special_tokens: list[str], prepend_scheme: str) -> Tokenizer:
    """Llama (BPE) and T5 (Unigram) style: "▁" marks a word start."""
    if model == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        trainer = trainers.BpeTrainer(vocab_size=150, special_tokens=special_tokens, show_progress=False)
    else:
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=150, special_tokens=special_tokens, unk_token="<unk>", show_progress=False
        )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def llama_tokenizer() -> PreTrainedTokenizerFast:
    # Llama 2: BOS <s> added in front, EOS </s>, no pad token
    tok = sentencepiece_like("bpe", ["<unk>", "<s>", "</s>"], prepend_scheme="first")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def t5_tokenizer() -> PreTrainedTokenizerFast:
    # T5: <pad>=0, </s>=1, <unk>=2; </s> appended to every text; no BOS
    tok = sentencepiece_like("unigram", ["<pad>", "</s>", "<unk>"], prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


# --- tiny models ------------------------------------------------------------------------------------
# Dropout is on in every config, so a bridge that let the LLM train would give different losses.
# Large init scales make the untrained models' greedy outputs depend on the soft prompt.


def build(family: str) -> tuple[nn.Module, PreTrainedTokenizerFast]:
    """A tiny LLM of `family` ("opt-untied": an OPT whose output layer is not its input embeddings,
    as the full ShapesWorld's OPT)."""
    if family in ("opt", "opt-untied"):
        tok = opt_tokenizer()
        rows = -(-len(tok) // 16) * 16  # a padded vocabulary, as real checkpoints have
        config = OPTConfig(
            vocab_size=rows, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
            max_position_embeddings=128, word_embed_proj_dim=32, dropout=0.1, attention_dropout=0.1,
            init_std=0.3, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, tie_word_embeddings=family == "opt",
        )
        return OPTForCausalLM(config), tok
    if family == "gpt2":
        tok = gpt2_tokenizer()
        config = GPT2Config(
            vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=4, initializer_range=0.3,
            bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
        )
        return GPT2LMHeadModel(config), tok
    if family == "llama":
        tok = llama_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, attention_dropout=0.1,
            initializer_range=0.3, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        )
        return LlamaForCausalLM(config), tok
    tok = t5_tokenizer()
    config = T5Config(
        vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.1,
        initializer_factor=3.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    return T5ForConditionalGeneration(config), tok


def save_llm(family: str, folder: str | Path) -> str:
    """Build a tiny `family` LLM with its tokenizer and save both to `folder`."""
    torch.manual_seed(0)
    model, tok = build(family)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def save_open_clip_vit(folder: Path, name: str = "qformer-test-tiny-vit", *, image_size: int = 32,
                       patch: int = 8, width: int = 32, layers: int = 3,
                       vision_options: dict | None = None) -> tuple[str, str]:
    """A tiny open_clip ViT registered under `name` and saved as a weights file: (name, file).
    `vision_options`: more `vision_cfg` entries, e.g. {"no_ln_pre": True} as the ShapesWorld ViT."""
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": image_size, "patch_size": patch, "width": width, "layers": layers,
                       "head_width": width // 4, "mlp_ratio": 2, **(vision_options or {})},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    config_file = folder / f"{name}.json"
    config_file.write_text(json.dumps(config))
    open_clip.add_model_config(config_file)  # registered under the file's stem
    weights = folder / f"{name}.safetensors"
    save_file(open_clip.create_model(name).state_dict(), str(weights))
    return name, str(weights)
