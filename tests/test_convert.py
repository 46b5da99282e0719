"""Conversion to and from transformers' BLIP-2 and the original LAVIS layout.

The parity tests (`pytest -k parity`) copy random weights between a tiny transformers
`Blip2ForImageTextRetrieval` and our model, both ways, and compare the outputs of every pass.
Nothing is downloaded: every model is built here.
"""

import json
import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.testing import assert_close
from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2QFormerConfig, Blip2VisionConfig

from qformer import QFormerConfig, Stage1Model, masks
from qformer.checkpoint import CheckpointError, load_state_dict_strict
from qformer.convert import (
    from_hf_qformer_config,
    from_hf_retrieval_config,
    load_lavis_checkpoint,
    qformer_from_hf,
    qformer_to_hf,
    stage1_from_hf_retrieval,
    stage1_from_lavis,
    stage1_to_hf_retrieval_state_dict,
    to_hf_qformer_config,
    to_hf_retrieval_config,
)

TOL = dict(rtol=0.0, atol=1e-5)
NUM_QUERIES = 4
# ln_vision eps as transformers' released configs have it (LAVIS: 1e-5); the conversions carry it
TINY = QFormerConfig.from_name("tiny", hidden_dropout=0.0, attention_dropout=0.0, vision_layer_norm_eps=1e-6)


def tiny_vision_config(width: int = 24) -> Blip2VisionConfig:
    return Blip2VisionConfig(
        hidden_size=width, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        image_size=16, patch_size=8, layer_norm_eps=1e-6,
    )  # fmt: skip


@torch.no_grad()
def randomize_(model: nn.Module) -> nn.Module:
    """Random values everywhere, so that no parity holds by accident: LayerNorms away from (1, 0),
    every bias non-zero, weights large enough that attention is far from uniform. The queries are
    normal(0, 0.02): transformers 5 initialises them to zeros, which would hide query bugs."""
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.weight.copy_(1 + 0.1 * torch.randn_like(m.weight))
            m.bias.normal_(0, 0.1)
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            m.weight.normal_(0, 0.2)
            if m.bias is not None:
                m.bias.normal_(0, 0.1)
        elif isinstance(m, nn.Embedding):
            m.weight.normal_(0, 1.0)
    for name, p in model.named_parameters():
        if name.endswith("query_tokens"):
            p.normal_(0, 0.02)
        elif name.endswith(("class_embedding", "position_embedding", "lm_head.bias")):
            p.normal_(0, 1.0)
        elif name == "temp":
            p.fill_(0.05)
    return model.eval()


@pytest.fixture(scope="module")
def hf_model() -> Blip2ForImageTextRetrieval:
    torch.manual_seed(1)
    qformer_config = Blip2QFormerConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, cross_attention_frequency=1, use_qformer_text_input=True,
    )  # fmt: skip
    config = Blip2Config(
        vision_config=tiny_vision_config(),
        qformer_config=qformer_config,
        num_query_tokens=NUM_QUERIES,
        image_text_hidden_size=16,
        image_token_index=None,  # plain text input_ids, no image placeholder tokens
    )
    return randomize_(Blip2ForImageTextRetrieval(config))


@pytest.fixture(scope="module")
def converted(hf_model):
    model, report = stage1_from_hf_retrieval(hf_model)
    return model.eval(), report


def inputs(b: int = 3, t: int = 7, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(b, 3, 16, 16, generator=g)
    ids = torch.randint(1, 100, (b, t), generator=g)
    text_mask = torch.ones(b, t, dtype=torch.long)
    text_mask[1, 4:] = 0
    text_mask[2, 6:] = 0
    return pixels, ids.masked_fill(text_mask == 0, 0), text_mask


@torch.no_grad()
def vision_tokens(hf: Blip2ForImageTextRetrieval, pixels):
    """The tower's tokens before post_layernorm (what our ln_vision takes) and after it (what
    transformers' Q-Former cross-attends to)."""
    vision = hf.vision_model
    out = vision(pixel_values=pixels, output_hidden_states=True)
    # hidden_states[0] is the patch embedding, [-1] the last block's output: the tokens before the norm
    before_norm = out.hidden_states[-1]
    encoder_output = vision.encoder(inputs_embeds=vision.embeddings(pixels)).last_hidden_state
    assert_close(before_norm, encoder_output, rtol=0, atol=0)
    assert_close(vision.post_layernorm(before_norm), out.last_hidden_state, rtol=0, atol=0)
    return before_norm, out.last_hidden_state


# ------------------------------------------------------------------ transformers -> ours
def test_import_report_names_what_is_skipped_and_missing(hf_model, converted):
    model, report = converted
    assert not report.unexpected and not report.mismatched
    # transformers has no LM head and no temperature: left as initialised, listed, not an error
    assert sorted(report.missing) == sorted(k for k in model.state_dict() if k.startswith("lm_head.") or k == "temp")
    tower = {k for k in hf_model.state_dict() if k.startswith("vision_model.") and ".post_layernorm." not in k}
    assert set(report.skipped) == tower and "vision tower" in next(iter(report.skipped.values()))
    assert torch.equal(model.ln_vision.weight, hf_model.vision_model.post_layernorm.weight)


@torch.no_grad()
def test_parity_query_pass_from_hf(hf_model, converted):
    model, _ = converted
    pixels, _, _ = inputs()
    before_norm, after_norm = vision_tokens(hf_model, pixels)
    queries = hf_model.query_tokens.expand(pixels.shape[0], -1, -1)
    expected = hf_model.qformer(query_embeds=queries, encoder_hidden_states=after_norm).last_hidden_state
    got, _ = model.encode_image(before_norm)  # applies ln_vision (= post_layernorm) itself
    assert got.shape == expected.shape == (3, NUM_QUERIES, 32)
    assert_close(got, expected, **TOL)
    assert expected[0].std(dim=0).mean() > 0.1  # the queries differ: the test is not vacuous


@torch.no_grad()
def test_parity_itm_pass_with_text_from_hf(hf_model, converted):
    model, _ = converted
    pixels, ids, text_mask = inputs()
    before_norm, after_norm = vision_tokens(hf_model, pixels)
    b, q = ids.shape[0], NUM_QUERIES
    embeds = hf_model.embeddings(input_ids=ids, query_embeds=hf_model.query_tokens.expand(b, -1, -1))
    attention_mask = torch.cat([torch.ones(b, q, dtype=torch.long), text_mask], dim=1)
    expected = hf_model.qformer(
        query_embeds=embeds, query_length=q, attention_mask=attention_mask, encoder_hidden_states=after_norm
    ).last_hidden_state  # (b, q + t, d)
    out = model.qformer(
        input_ids=ids, mask=masks.bidirectional_mask(q, text_mask), image_embeds=model.vision_tokens(before_norm)
    )
    assert_close(out.query_output, expected[:, :q], **TOL)
    assert_close(out.text_output, expected[:, q:], **TOL)  # padded rows included: same masked keys


@torch.no_grad()
def test_parity_retrieval_scores_from_hf(hf_model, converted):
    model, _ = converted
    pixels, ids, text_mask = inputs()
    before_norm, _ = vision_tokens(hf_model, pixels)

    itc = hf_model(pixel_values=pixels, input_ids=ids, attention_mask=text_mask, use_image_text_matching_head=False)
    _, image_feats = model.encode_image(before_norm)
    _, text_feats = model.encode_text(ids, text_mask)
    scores = model.itc_scores(image_feats, text_feats)  # (images, texts)
    assert scores.shape == itc.logits_per_image.shape == (3, 3)
    assert_close(scores, itc.logits_per_image, **TOL)
    assert itc.logits_per_image.std() > 0.01

    itm = hf_model(pixel_values=pixels, input_ids=ids, attention_mask=text_mask, use_image_text_matching_head=True)
    logits = model.itm_logits(before_norm, ids, text_mask)  # pairs (image i, text i)
    assert logits.shape == itm.logits_per_image.shape == (3, 2)
    assert_close(logits, itm.logits_per_image, **TOL)


# ------------------------------------------------------------------ ours -> transformers
@torch.no_grad()
def test_parity_reverse():
    ours = randomize_(Stage1Model(TINY))
    state_dict, skipped = stage1_to_hf_retrieval_state_dict(ours)
    assert set(skipped) == {k for k in ours.state_dict() if k.startswith("lm_head.")} | {"temp"}
    vision_keys = {k for k in state_dict if k.startswith("vision_model.")}
    assert vision_keys == {"vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias"}

    hf = randomize_(Blip2ForImageTextRetrieval(to_hf_retrieval_config(TINY, tiny_vision_config(TINY.vision_width))))
    tower = {k: v for k, v in hf.state_dict().items() if k.startswith("vision_model.") and k not in state_dict}
    report = load_state_dict_strict(hf, {**tower, **state_dict}, source="our Stage1Model")  # strict
    assert report.ok and not report.missing
    hf.eval()

    pixels, ids, text_mask = inputs()
    before_norm, after_norm = vision_tokens(hf, pixels)
    queries = hf.query_tokens.expand(3, -1, -1)
    query_out, image_feats = ours.encode_image(before_norm)
    expected = hf.qformer(query_embeds=queries, encoder_hidden_states=after_norm).last_hidden_state
    assert_close(query_out, expected, **TOL)
    _, text_feats = ours.encode_text(ids, text_mask)
    itc = hf(pixel_values=pixels, input_ids=ids, attention_mask=text_mask, use_image_text_matching_head=False)
    assert_close(itc.logits_per_image, ours.itc_scores(image_feats, text_feats), **TOL)
    itm = hf(pixel_values=pixels, input_ids=ids, attention_mask=text_mask, use_image_text_matching_head=True)
    assert_close(itm.logits_per_image, ours.itm_logits(before_norm, ids, text_mask), **TOL)


@torch.no_grad()
def test_parity_qformer_module_both_ways():
    """Our QFormer alone <-> Blip2QFormerModel + query tokens + text embeddings."""
    ours = randomize_(Stage1Model(TINY)).qformer
    hf_qformer, query_tokens, embeddings = qformer_to_hf(ours)
    hf_qformer.eval()
    image = torch.randn(3, 5, TINY.vision_width)
    _, ids, text_mask = inputs()
    expected = hf_qformer(query_embeds=query_tokens.expand(3, -1, -1), encoder_hidden_states=image).last_hidden_state
    assert_close(ours(image_embeds=image).hidden_states, expected, **TOL)
    expected_text = hf_qformer(query_embeds=embeddings(input_ids=ids), query_length=0, attention_mask=text_mask)
    got_text = ours(input_ids=ids, mask=masks.text_only_mask(text_mask), use_queries=False).hidden_states
    assert_close(got_text, expected_text.last_hidden_state, **TOL)

    back, report = qformer_from_hf(hf_qformer, query_tokens, embeddings=embeddings)
    assert report.ok and not report.missing
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key

    # without the text embeddings (a Blip2ForConditionalGeneration has none) they are missing, allowed
    _, report = qformer_from_hf(hf_qformer, query_tokens)
    assert sorted(report.missing) == ["embeddings.position.weight", "embeddings.word.weight"]


def test_round_trip_hf():
    ours = randomize_(Stage1Model(TINY))
    state_dict, skipped = stage1_to_hf_retrieval_state_dict(ours)
    back, report = stage1_from_hf_retrieval(state_dict, TINY)
    assert not report.unexpected and not report.mismatched
    # what transformers lacks: dropped on export, missing (allowed) on import, named both times
    not_in_hf = ["lm_head.bias", "lm_head.dense.weight", "lm_head.dense.bias", "lm_head.norm.weight",
                 "lm_head.norm.bias", "temp"]  # fmt: skip
    assert sorted(report.missing) == sorted(skipped) == sorted(not_in_hf)
    for key, value in ours.state_dict().items():
        if key not in skipped:
            assert torch.equal(back.state_dict()[key], value), key


def test_hf_strictness_names_keys(hf_model):
    # the transformers model has cross-attention in every layer; a config with it every 2nd layer
    # leaves layer 1's cross-attention unmatched: named, and the load refused
    config = from_hf_retrieval_config(hf_model.config, cross_attention_freq=2)
    key = "qformer.encoder.layer.1.crossattention.attention.query.weight"
    with pytest.raises(CheckpointError, match=re.escape(key)):
        stage1_from_hf_retrieval(hf_model.state_dict(), config)
    state_dict = {**hf_model.state_dict(), "qformer.pooler.dense.weight": torch.zeros(1)}
    del state_dict["itm_head.bias"]
    _, report = stage1_from_hf_retrieval(state_dict, from_hf_retrieval_config(hf_model.config), strict=False)
    assert report.unexpected == ["qformer.pooler.dense.weight"] and "itm_head.bias" in report.missing
    with pytest.raises(ValueError, match="config="):
        stage1_from_hf_retrieval(hf_model.state_dict())
    with pytest.warns(UserWarning, match="zeros"):
        zero_queries = {**hf_model.state_dict(), "query_tokens": torch.zeros(1, NUM_QUERIES, 32)}
        stage1_from_hf_retrieval(zero_queries, from_hf_retrieval_config(hf_model.config))


# ------------------------------------------------------------------ configs
def test_config_round_trip_and_errors():
    cfg = TINY.replace(hidden_act="gelu_new", layer_norm_eps=1e-6, pad_token_id=3)
    hf_cfg = to_hf_retrieval_config(cfg, tiny_vision_config(cfg.vision_width))
    assert hf_cfg.qformer_config.use_qformer_text_input and hf_cfg.qformer_config.encoder_hidden_size == 24
    back = from_hf_retrieval_config(hf_cfg)
    assert back.meta == {"converted_from": "Blip2QFormerConfig"}
    assert back.replace(meta={}) == cfg
    # the Q-Former config alone does not hold the vision LayerNorm's eps: it comes back as the default
    alone = from_hf_qformer_config(to_hf_qformer_config(cfg), num_query_tokens=4, embed_dim=16)
    assert alone.replace(meta={}) == cfg.replace(vision_layer_norm_eps=1e-5)
    with pytest.raises(ValueError, match=r"layer_norm_eps \(1e-05\).*ln_vision.*1e-06"):
        to_hf_retrieval_config(cfg, Blip2VisionConfig(hidden_size=24, layer_norm_eps=1e-5))

    with pytest.raises(ValueError, match=r"hidden_size \(30\) is not divisible by num_attention_heads \(4\)"):
        from_hf_qformer_config(Blip2QFormerConfig(hidden_size=30, num_attention_heads=4), num_query_tokens=4)
    with pytest.raises(ValueError, match="hidden_act 'silu'") as err:
        from_hf_qformer_config(Blip2QFormerConfig(hidden_act="silu", pad_token_id=None), num_query_tokens=4)
    assert "pad_token_id" in str(err.value)  # every problem, not just the first
    with pytest.raises(ValueError, match="vision_width"):
        to_hf_retrieval_config(TINY, tiny_vision_config(width=48))


# ------------------------------------------------------------------ LAVIS -> ours
# The original layout, written out by hand from LAVIS's Qformer.py (BertLayer), independently of
# the tables in qformer/convert.py: LAVIS name -> our module name, inside one layer.
LAVIS_LAYER = {
    "attention.self.query": "self_attn.q",
    "attention.self.key": "self_attn.k",
    "attention.self.value": "self_attn.v",
    "attention.output.dense": "self_attn.out",
    "attention.output.LayerNorm": "self_attn.norm",
    "crossattention.self.query": "cross_attn.q",
    "crossattention.self.key": "cross_attn.k",
    "crossattention.self.value": "cross_attn.v",
    "crossattention.output.dense": "cross_attn.out",
    "crossattention.output.LayerNorm": "cross_attn.norm",
    "intermediate.dense": "ffn_text.fc1",
    "output.dense": "ffn_text.fc2",
    "output.LayerNorm": "ffn_text.norm",
    "intermediate_query.dense": "ffn_query.fc1",
    "output_query.dense": "ffn_query.fc2",
    "output_query.LayerNorm": "ffn_query.norm",
}
LAVIS_EXTRAS = {  # keys a stage-1 load must skip: vision tower, LLM side, buffers, tied copies
    "visual_encoder.patch_embed.proj.weight",
    "visual_encoder.blocks.0.attn.qkv.weight",
    "opt_proj.weight",
    "t5_model.shared.weight",
    "llm_model.lm_head.weight",
    "Qformer.bert.embeddings.position_ids",
    "Qformer.cls.predictions.decoder.weight",
    "Qformer.cls.predictions.decoder.bias",
}


def lavis_state_dict(model: Stage1Model) -> dict[str, torch.Tensor]:
    ours = {k: v.clone() for k, v in model.state_dict().items()}
    sd = {
        "query_tokens": ours["qformer.query_tokens"],
        "Qformer.bert.embeddings.word_embeddings.weight": ours["qformer.embeddings.word.weight"],
        "Qformer.bert.embeddings.position_embeddings.weight": ours["qformer.embeddings.position.weight"],
        "Qformer.bert.embeddings.LayerNorm.weight": ours["qformer.embeddings.norm.weight"],
        "Qformer.bert.embeddings.LayerNorm.bias": ours["qformer.embeddings.norm.bias"],
        "Qformer.bert.embeddings.position_ids": torch.arange(model.config.max_position_embeddings)[None],
        "Qformer.cls.predictions.transform.dense.weight": ours["lm_head.dense.weight"],
        "Qformer.cls.predictions.transform.dense.bias": ours["lm_head.dense.bias"],
        "Qformer.cls.predictions.transform.LayerNorm.weight": ours["lm_head.norm.weight"],
        "Qformer.cls.predictions.transform.LayerNorm.bias": ours["lm_head.norm.bias"],
        "Qformer.cls.predictions.bias": ours["lm_head.bias"],
        # tied in the original: copies of the word embeddings and of the head's bias
        "Qformer.cls.predictions.decoder.weight": ours["qformer.embeddings.word.weight"].clone(),
        "Qformer.cls.predictions.decoder.bias": ours["lm_head.bias"].clone(),
        "ln_vision.weight": ours["ln_vision.weight"],
        "ln_vision.bias": ours["ln_vision.bias"],
        "vision_proj.weight": ours["vision_proj.weight"],
        "vision_proj.bias": ours["vision_proj.bias"],
        "text_proj.weight": ours["text_proj.weight"],
        "text_proj.bias": ours["text_proj.bias"],
        "itm_head.weight": ours["itm_head.weight"],
        "itm_head.bias": ours["itm_head.bias"],
        "temp": ours["temp"],
        "visual_encoder.patch_embed.proj.weight": torch.randn(8, 3, 2, 2),
        "visual_encoder.blocks.0.attn.qkv.weight": torch.randn(6, 2),
        "opt_proj.weight": torch.randn(5, 32),
        "t5_model.shared.weight": torch.randn(7, 5),
        "llm_model.lm_head.weight": torch.randn(7, 5),
    }
    for i in range(model.config.num_layers):
        for theirs, mine in LAVIS_LAYER.items():
            if f"qformer.layers.{i}.{mine}.weight" not in ours:
                continue  # a layer without cross-attention
            for param in ("weight", "bias"):
                sd[f"Qformer.bert.encoder.layer.{i}.{theirs}.{param}"] = ours[f"qformer.layers.{i}.{mine}.{param}"]
    return sd


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_lavis_layout(tmp_path):
    source = randomize_(Stage1Model(TINY))
    sd = lavis_state_dict(source)
    model, report = stage1_from_lavis(sd, TINY)
    assert_same_weights(model, source)  # every tensor, lm_head and temp included
    assert report.ok and not report.missing and set(report.skipped) == LAVIS_EXTRAS
    assert "vision tower" in report.skipped["visual_encoder.blocks.0.attn.qkv.weight"]
    assert "language model" in report.skipped["t5_model.shared.weight"]

    # the files LAVIS writes: {"model": ..., "epoch": ...} in a .pth, or a plain .safetensors
    torch.save({"model": sd, "epoch": 3}, tmp_path / "blip2.pth")
    assert_same_weights(stage1_from_lavis(tmp_path / "blip2.pth", TINY)[0], source)
    save_file(sd, str(tmp_path / "blip2.safetensors"))
    assert_same_weights(stage1_from_lavis(tmp_path / "blip2.safetensors", TINY)[0], source)


def test_lavis_tied_decoder_is_verified():
    sd = lavis_state_dict(Stage1Model(TINY))
    sd["Qformer.cls.predictions.decoder.weight"] = sd["Qformer.cls.predictions.decoder.weight"] + 1e-3
    message = "Qformer.cls.predictions.decoder.weight differs from Qformer.bert.embeddings.word_embeddings.weight"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        stage1_from_lavis(sd, TINY)


def test_lavis_unknown_key_is_named():
    sd = {**lavis_state_dict(Stage1Model(TINY)), "Qformer.bert.pooler.dense.weight": torch.zeros(32, 32)}
    with pytest.raises(CheckpointError, match=re.escape("Qformer.bert.pooler.dense.weight")):
        stage1_from_lavis(sd, TINY)
    _, report = stage1_from_lavis(sd, TINY, strict=False)
    assert report.unexpected == ["Qformer.bert.pooler.dense.weight"]


def test_lavis_wrong_shape_names_key_and_both_shapes():
    sd = lavis_state_dict(Stage1Model(TINY))
    sd["vision_proj.weight"] = torch.zeros(3, 32)
    with pytest.raises(CheckpointError, match=r"vision_proj\.weight: .*\(3, 32\) vs model \(16, 32\)"):
        stage1_from_lavis(sd, TINY)
    # a renamed key is named by its LAVIS name too
    sd = lavis_state_dict(Stage1Model(TINY))
    sd["Qformer.bert.encoder.layer.1.output.dense.weight"] = torch.zeros(32, 32)
    key = re.escape("Qformer.bert.encoder.layer.1.output.dense.weight")
    with pytest.raises(CheckpointError, match=key + r" .*\(32, 32\) vs model \(32, 64\)"):
        stage1_from_lavis(sd, TINY)


class Opaque:  # any object a weights-only unpickler must refuse
    pass


def test_lavis_file_that_is_not_plain_tensors_is_refused(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"model": {"temp": torch.tensor(0.07)}, "extra": Opaque()}, path)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*not a plain tensor checkpoint.*Opaque"):
        load_lavis_checkpoint(path)
    path = tmp_path / "strings.pth"
    torch.save({"model": {"temp": torch.tensor(0.07), "note": "hello"}}, path)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*'note'"):
        stage1_from_lavis(path, TINY)


# ------------------------------------------------------------------ the `qformer import` command
def test_cli_import_lavis_and_hf(tmp_path, capsys):
    from qformer.cli import main

    source = Stage1Model(TINY)
    torch.save(lavis_state_dict(source), tmp_path / "blip2.pth")
    assert main(["import", "--from", "lavis", str(tmp_path / "blip2.pth"), "--out", str(tmp_path / "a"), "--preset", "tiny"]) == 0
    assert_same_weights(Stage1Model.from_pretrained(tmp_path / "a"), source)

    hf = hf_retrieval_dir(tmp_path / "hf")
    assert main(["import", "--from", "hf-blip2", str(tmp_path / "hf"), "--out", str(tmp_path / "b")]) == 0
    imported = Stage1Model.from_pretrained(tmp_path / "b")
    torch.testing.assert_close(imported.qformer.query_tokens, hf.query_tokens, rtol=0, atol=0)
    assert "skipped" in capsys.readouterr().out  # the vision tower is reported, not silently dropped


def hf_retrieval_dir(directory, *, processor: bool = True) -> Blip2ForImageTextRetrieval:
    """A tiny Blip2ForImageTextRetrieval saved as a hub repository is: weights, config, and (with
    `processor`) a BERT tokenizer whose [DEC] is the vocabulary's last id, and an image processor."""
    from transformers import BlipImageProcessor

    hf = randomize_(Blip2ForImageTextRetrieval(to_hf_retrieval_config(TINY, tiny_vision_config(TINY.vision_width))))
    hf.save_pretrained(directory)
    if processor:
        tiny_bert_tokenizer(directory).save_pretrained(directory)
        BlipImageProcessor(size={"height": 16, "width": 16}).save_pretrained(directory)
    return hf


def tiny_bert_tokenizer(directory, size: int = TINY.vocab_size):
    """A BERT tokenizer of `size` tokens, [PAD] = 0 and [DEC] the last, as BLIP-2's is."""
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(size - 6)]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(directory / "vocab.txt"))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def test_lavis_import_with_tokenizer(tmp_path, capsys):
    """A LAVIS file has no tokenizer: `--tokenizer` names one, checked against the Q-Former and
    saved beside it; one that does not fit is refused before anything is written."""
    from qformer.bert_init import load_tokenizer
    from qformer.cli import main

    torch.save(lavis_state_dict(Stage1Model(TINY)), tmp_path / "blip2.pth")
    tiny_bert_tokenizer(tmp_path / "bert").save_pretrained(tmp_path / "bert")
    argv = ["import", "--from", "lavis", str(tmp_path / "blip2.pth"), "--preset", "tiny", "--tokenizer"]
    assert main([*argv, str(tmp_path / "bert"), "--out", str(tmp_path / "a")]) == 0
    assert load_tokenizer(tmp_path / "a" / "tokenizer").bos_token_id == TINY.dec_token_id == TINY.vocab_size - 1

    tiny_bert_tokenizer(tmp_path / "small", size=50).save_pretrained(tmp_path / "small")
    assert main([*argv, str(tmp_path / "small"), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "[DEC] = 49" in err and not (tmp_path / "b").exists()


def test_lavis_import_with_vision_tower_is_ready_for_retrieval_eval(tmp_path, capsys):
    """A LAVIS file has no tower either: `--vision` names one (JSON, or a config file's `vision:`),
    checked against ln_vision's width and written to the checkpoint's config, so that with
    `--tokenizer` retrieval evaluation loads the import as it is; a tower of another width is
    refused before anything is written."""
    from tiny_models import save_open_clip_vit

    from qformer.cli import main
    from qformer.evaluate import load_stage1

    torch.save(lavis_state_dict(Stage1Model(TINY)), tmp_path / "blip2.pth")
    tiny_bert_tokenizer(tmp_path / "bert").save_pretrained(tmp_path / "bert")
    name, weights = save_open_clip_vit(tmp_path / "vit", "qformer-test-lavis-vit", image_size=16, width=TINY.vision_width)
    spec = {"source": "open_clip", "name": name, "pretrained": weights, "layer": -2}
    argv = ["import", "--from", "lavis", str(tmp_path / "blip2.pth"), "--preset", "tiny", "--tokenizer", str(tmp_path / "bert")]
    assert main([*argv, "--vision", json.dumps(spec), "--out", str(tmp_path / "a")]) == 0
    model, tokenizer, vision = load_stage1(tmp_path / "a")
    assert vision.spec["name"] == name and vision.width == TINY.vision_width
    with torch.no_grad():
        tokens = vision(torch.randn(2, 3, 16, 16))
        feats = model.encode_image(tokens)[1]
    assert tokens.shape == (2, 5, TINY.vision_width) and feats.shape == (2, TINY.num_query_tokens, TINY.embed_dim)

    (tmp_path / "run.yaml").write_text(f"recipe: stage1\nvision:\n  source: open_clip\n  name: {name}\n  pretrained: {weights}\n")
    assert main([*argv, "--vision", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["vision"]["pretrained"] == weights

    wide, wide_weights = save_open_clip_vit(tmp_path / "vit", "qformer-test-lavis-vit-wide", image_size=16, width=32)
    wrong = json.dumps({"source": "open_clip", "name": wide, "pretrained": wide_weights})
    assert main([*argv, "--vision", wrong, "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "32 wide" in err and f"reads {TINY.vision_width}" in err and not (tmp_path / "c").exists()
    assert main([*argv, "--vision", '{"source": "open_clip"', "--out", str(tmp_path / "d")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_hf_retrieval_import_describes_itself(tmp_path):
    """The imported stage-1 checkpoint carries its tokenizer and tower: retrieval evaluation loads
    it as it is, and its tower gives the tokens transformers' own tower gives."""
    from qformer.evaluate import load_stage1
    from qformer.hf_blip2 import import_hf_blip2

    hf = hf_retrieval_dir(tmp_path / "hf").eval()
    assert import_hf_blip2(tmp_path / "hf", tmp_path / "out")[0] == "stage-1"
    model, tokenizer, vision = load_stage1(tmp_path / "out")
    last = TINY.vocab_size - 1
    assert (tokenizer.bos_token, tokenizer.bos_token_id, len(tokenizer)) == ("[DEC]", last, TINY.vocab_size)
    pixels = torch.randn(2, 3, 16, 16)
    before_norm, after_norm = vision_tokens(hf, pixels)
    with torch.no_grad():
        assert_close(vision(pixels), before_norm, **TOL)
        assert_close(model.ln_vision(vision(pixels)), after_norm, **TOL)


def test_hf_retrieval_import_without_processor_is_refused(tmp_path):
    from qformer.hf_blip2 import import_hf_blip2

    hf_retrieval_dir(tmp_path / "hf", processor=False)
    with pytest.raises(FileNotFoundError, match="image processor.*stage-1 checkpoint needs it"):
        import_hf_blip2(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_import_rejects_a_pickle(tmp_path, capsys):
    from qformer.cli import main

    torch.save({"model": {"query_tokens": torch.zeros(1, 4, 32), "opts": object.__new__(NotATensor)}}, tmp_path / "bad.pth")
    assert main(["import", "--from", "lavis", str(tmp_path / "bad.pth"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "bad.pth" in err and not (tmp_path / "x").exists()


class NotATensor:
    pass
