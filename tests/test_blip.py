"""BLIP: MED parameter sharing, momentum encoders and queue, alpha ramp, ITM hard negatives, the LM
loss (prompt masking, label smoothing), a short overfit, generation, checkpoints and their parts.

Everything is tiny and on the CPU: a 2-layer open_clip ViT the tests save, a word-level BERT-style
tokenizer built here, and the "tiny" BlipConfig.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from tiny_models import save_open_clip_vit
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel, PreTrainedTokenizerFast

from qformer import masks
from qformer.blip import (
    PARTS,
    BlipConfig,
    BlipModel,
    FeatureQueue,
    alpha_ramp,
    init_from_bert,
    itc_distill_loss,
    load_blip_tokenizer,
    part_of,
)
from qformer.checkpoint import CheckpointError
from qformer.eval.retrieval import retrieval_scores
from qformer.losses import itg_loss

WORDS = "a picture of cat dog dogs red blue ball sits on the mat runs run in park two small big".split()
CAPTIONS = ["a cat sits on the mat", "two dogs run in the park", "a red ball", "a big blue dog"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    """A BERT-style word-level tokenizer with [DEC]/[ENC] added, and a tiny open_clip ViT config."""
    root = tmp_path_factory.mktemp("blip-assets")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(specials + WORDS)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    ).save_pretrained(root / "tokenizer")  # fmt: skip
    name, _ = save_open_clip_vit(root / "vit", "blip-test-tiny-vit", layers=2)
    return {
        "tokenizer": load_blip_tokenizer(root / "tokenizer"),
        "tokenizer_dir": root / "tokenizer",
        "vit": str(root / "vit" / f"{name}.json"),
    }


def make(assets, **overrides) -> BlipModel:
    settings = dict(vision_name=assets["vit"], hidden_dropout=0.0, attention_dropout=0.0, queue_size=8)
    config = BlipConfig.from_name("tiny", **{**settings, **overrides}).with_tokenizer(assets["tokenizer"])
    return BlipModel(config, assets["tokenizer"])


def batch(model: BlipModel, captions=CAPTIONS, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(len(captions), 3, 32, 32, generator=g)
    ids, mask = model.tokenize(captions)
    return pixels, ids, mask


# ------------------------------------------------------------------------------ MED sharing
def _attention(d: int, kv: int) -> int:
    return 2 * d * d + 2 * kv * d + 6 * d  # q, k, v, out (weights + biases), LayerNorm


@pytest.mark.parametrize("share", [True, False])
def test_encoder_and_decoder_share_all_but_self_attention(assets, share):
    model = make(assets, share_encoder_decoder=share)
    cfg = model.config
    enc, dec = model.text_encoder, model.text_decoder
    for e, d in zip(enc.layers, dec.layers):
        assert d.self_attn is not e.self_attn
        assert (d.cross_attn is e.cross_attn) == share and (d.ffn is e.ffn) == share
    assert (dec.embeddings is enc.embeddings) == share

    # by parameter identity: shared = exactly every decoder tensor outside self-attention
    enc_ids = {id(p) for p in enc.parameters()}
    dec_named = dict(dec.named_parameters())
    shared = {n for n, p in dec_named.items() if id(p) in enc_ids}
    expected = {n for n in dec_named if ".self_attn." not in n} if share else set()
    assert shared == expected

    # trainable parameter count against a hand computation
    d, w, i, V, P, L, e = (
        cfg.hidden_size, cfg.vision_width, cfg.intermediate_size, cfg.vocab_size,
        cfg.max_position_embeddings, cfg.num_layers, cfg.embed_dim,
    )  # fmt: skip
    ffn = 2 * d * i + i + 3 * d
    embeddings = V * d + P * d + 2 * d
    encoder = embeddings + L * (_attention(d, d) + _attention(d, w) + ffn)
    decoder = L * _attention(d, d) if share else encoder
    vit = sum(p.numel() for p in model.vision.parameters())
    heads = (w * e + e) + (d * e + e) + (2 * d + 2) + (d * d + d + 2 * d + V) + 1  # projs, ITM, LM, temp
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == vit + 2 * w + encoder + decoder + heads
    momentum = sum(p.numel() for p in model.momentum_parameters())
    assert momentum == vit + 2 * w + encoder + (w * e + e) + (d * e + e)
    assert not any(p.requires_grad for p in model.momentum_parameters())


def test_state_dict_holds_each_shared_tensor_once_and_loads_back(assets):
    model = make(assets)
    state = model.state_dict()
    assert not any(k.startswith("text_decoder.") and ".self_attn." not in k for k in state)
    assert len(state) == len({id(t) for t in model.parameters()}) + 4  # + the queue: image, text, ids, ptr
    assert {part_of(k) for k in state} == set(PARTS)  # every key belongs to a part

    other = make(assets)
    other.load_state_dict(state)  # strict: the aliases are filled from the encoder's keys
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(p, q), name
    assert other.text_decoder.layers[0].ffn is other.text_encoder.layers[0].ffn


def test_the_vit_trains_and_the_momentum_copies_do_not(assets):
    model = make(assets).train()
    pixels, ids, mask = batch(model)
    assert model.vision.training and model.vision.tower.training
    model(pixels, ids, mask)["loss"].backward()
    assert all(p.grad is not None for p in model.vision.parameters())
    assert all(p.grad is None for p in model.momentum_parameters())
    assert model.temp.grad is not None and model.itm_head.weight.grad is not None


# ------------------------------------------------------------------------------ momentum, queue
def test_momentum_update_matches_hand_computation(assets):
    model = make(assets, momentum=0.9)
    with torch.no_grad():
        for p in model.momentum_parameters():
            p.add_(torch.randn_like(p))
    online = [p.detach().clone() for on, _ in model._momentum_pairs() for p in on.parameters()]
    before = [p.clone() for p in model.momentum_parameters()]
    model.momentum_update()
    for p, p_m, p_m_new in zip(online, before, model.momentum_parameters(), strict=True):
        torch.testing.assert_close(p_m_new, 0.9 * p_m + 0.1 * p)


def test_queue_pointer_wraps_around():
    queue = FeatureQueue(6, 3)
    assert queue.image.shape == (6, 3) and queue.text.shape == (6, 3) and int(queue.ptr) == 0
    assert torch.equal(queue.ids, torch.full((6,), -1))
    batches = [(torch.full((2, 3), float(s)), torch.full((2, 3), -float(s)), torch.tensor([s, s])) for s in range(4)]
    pointers = []
    for image, text, ids in batches:
        queue.enqueue(image, text, ids)
        pointers.append(int(queue.ptr))
    assert pointers == [2, 4, 0, 2]
    # the fourth batch overwrote the first; the second and third are still there
    assert queue.image[:, 0].tolist() == [3, 3, 1, 1, 2, 2]
    assert queue.text[:, 0].tolist() == [-3, -3, -1, -1, -2, -2]
    assert queue.ids.tolist() == [3, 3, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="queue_size=6 is not a multiple of the world batch"):
        queue.enqueue(torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))


def test_training_step_enqueues_momentum_features_and_eval_changes_nothing(assets):
    model = make(assets, queue_size=8)
    pixels, ids, mask = batch(model)
    image_ids = torch.tensor([5, 6, 7, 8])
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model(pixels, ids, mask, image_ids=image_ids)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # no update, no enqueue

    model.train()
    model(pixels, ids, mask, image_ids=image_ids)
    assert int(model.queue.ptr) == 4
    with torch.no_grad():  # features of the *updated* momentum encoders (no dropout in this config)
        image_m = model.vision_norm_m(model.vision_m(pixels).float())
        expected = F.normalize(model.vision_proj_m(image_m[:, 0]), dim=-1)
        text_m, _ = model.text_encoder_m(ids, mask=masks.text_only_mask(mask))
        expected_text = F.normalize(model.text_proj_m(text_m[:, 0]), dim=-1)
    torch.testing.assert_close(model.queue.image[:4], expected)
    torch.testing.assert_close(model.queue.text[:4], expected_text)
    assert model.queue.ids.tolist() == [5, 6, 7, 8, -1, -1, -1, -1]
    model(pixels, ids, mask, image_ids=image_ids)
    assert int(model.queue.ptr) == 0  # wrapped

    odd = make(assets, queue_size=6).train()
    with pytest.raises(ValueError, match="queue_size=6 is not a multiple of the world batch"):
        odd(pixels, ids, mask)


def test_alpha_ramp():
    assert alpha_ramp(0, 100) == 0.0
    assert alpha_ramp(25, 100) == pytest.approx(0.1)
    assert alpha_ramp(50, 100, final=0.4) == pytest.approx(0.2)
    assert alpha_ramp(100, 100) == pytest.approx(0.4)
    assert alpha_ramp(10_000, 100) == pytest.approx(0.4)
    assert alpha_ramp(3, 0) == 0.4
    with pytest.raises(ValueError, match="non-negative"):
        alpha_ramp(-1, 100)


def test_itc_distill_loss_against_hand_computation():
    g = torch.Generator().manual_seed(0)
    sim_i2t, sim_t2i, sim_i2t_m, sim_t2i_m = (torch.randn(3, 7, generator=g) for _ in range(4))
    positives = torch.zeros(3, 7, dtype=torch.bool)
    positives[[0, 1, 2], [0, 1, 2]] = True
    positives[0, 5] = True  # a queue entry showing the same image
    hard = positives.float() / positives.float().sum(1, keepdim=True)
    for alpha in (0.0, 0.4):
        loss = itc_distill_loss(sim_i2t, sim_t2i, sim_i2t_m, sim_t2i_m, positives, alpha)
        expected = 0.0
        for sim, sim_m in ((sim_i2t, sim_i2t_m), (sim_t2i, sim_t2i_m)):
            targets = alpha * sim_m.softmax(1) + (1 - alpha) * hard
            expected += F.cross_entropy(sim, targets) / 2  # cross_entropy takes soft targets
        torch.testing.assert_close(loss, expected)


# ------------------------------------------------------------------------------ ITM negatives
def test_hard_negatives_never_pick_a_positive(assets):
    model = make(assets)
    image_ids = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    # items of one image have identical features, so the positives are by far the most similar
    centers = F.normalize(torch.randn(4, model.config.embed_dim), dim=-1)
    feats = centers[image_ids] + 0.01 * torch.randn(8, model.config.embed_dim)
    picked = set()
    for seed in range(50):
        g = torch.Generator().manual_seed(seed)
        neg_text, neg_image = model.hard_negatives(feats, feats, image_ids=image_ids, generator=g)
        assert (image_ids[neg_text] != image_ids).all() and (image_ids[neg_image] != image_ids).all()
        picked.update(neg_text.tolist())
        neg_text, neg_image = model.hard_negatives(feats, feats, generator=g)  # no ids: never itself
        assert (neg_text != torch.arange(8)).all() and (neg_image != torch.arange(8)).all()
    assert len(picked) > 4  # sampled, not always the same one
    with pytest.raises(ValueError, match="at least two distinct images"):
        model.hard_negatives(feats[:2], feats[:2], image_ids=torch.tensor([3, 3]))

    # two images with the same caption: each is the other's most similar item, never its negative
    _, ids, _ = batch(model, captions=["a red ball", "a red ball", "a cat", "two dogs", "a big dog"])
    feats = F.normalize(torch.randn(5, model.config.embed_dim), dim=-1)
    feats[1] = feats[0] + 0.01
    for seed in range(50):
        g = torch.Generator().manual_seed(seed)
        neg_text, neg_image = model.hard_negatives(feats, feats, image_ids=torch.arange(5), input_ids=ids, generator=g)
        assert neg_text[0] != 1 and neg_text[1] != 0 and neg_image[0] != 1 and neg_image[1] != 0
        assert (neg_text != torch.arange(5)).all() and (neg_image != torch.arange(5)).all()


# ------------------------------------------------------------------------------ LM loss
def test_decoder_inputs_put_the_prompt_after_dec_and_mask_it(assets):
    model = make(assets)
    _, ids, mask = batch(model)
    dec_ids, dec_mask, labels = model.decoder_inputs(ids, mask)
    prompt = model.tokenizer("a picture of ", add_special_tokens=False)["input_ids"]
    P = len(prompt)
    assert P == 3
    assert (dec_ids[:, 0] == model.config.dec_token_id).all()
    assert (dec_ids[:, 1 : 1 + P] == torch.tensor(prompt)).all()
    torch.testing.assert_close(dec_ids[:, 1 + P :], ids[:, 1:])  # the caption without [CLS]
    assert (labels[:, : 1 + P] == -100).all()
    assert (labels[:, 1 + P :] == ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)).all()
    assert (dec_mask[:, 1 + P :] == mask[:, 1:]).all() and (dec_mask[:, : 1 + P] == 1).all()


def test_lm_loss_ignores_prompt_logits_and_smooths_labels_as_torch(assets):
    model = make(assets).eval()
    pixels, ids, mask = batch(model)
    dec_ids, dec_mask, labels = model.decoder_inputs(ids, mask)
    P = model.prompt_ids.numel()
    logits = torch.randn(*dec_ids.shape, model.config.vocab_size)
    loss = itg_loss(logits, labels, label_smoothing=0.1)
    changed = logits.clone()
    changed[:, :P] += 5 * torch.randn(changed[:, :P].shape)  # positions predicting the prompt
    torch.testing.assert_close(itg_loss(changed, labels, label_smoothing=0.1), loss)
    changed[:, P] += 5 * torch.randn(changed[:, P].shape)  # predicts the first caption word
    assert not torch.allclose(itg_loss(changed, labels, label_smoothing=0.1), loss)

    # the model's LM loss = label-smoothed cross-entropy over exactly the caption tokens
    out = model(pixels, ids, mask, objectives=("lm",))
    with torch.no_grad():
        image = model.embed_image(pixels)
        hidden, _ = model.text_decoder(
            dec_ids, mask=masks.multimodal_causal_mask(0, dec_mask), image_kv=model.text_decoder.image_kv(image)
        )
        logits = model.lm_head(hidden, model.text_decoder.embeddings.word.weight)
    rows, targets = logits[:, :-1][labels[:, 1:] != -100], labels[:, 1:][labels[:, 1:] != -100]
    assert targets.numel() == int(mask[:, 1:].sum())  # every caption token after [CLS], [SEP] included
    logp = rows.log_softmax(-1)
    by_hand = (0.9 * -logp.gather(1, targets[:, None]).squeeze(1) + 0.1 * -logp.mean(-1)).mean()
    torch.testing.assert_close(out["lm"], by_hand)
    torch.testing.assert_close(out["lm"], F.cross_entropy(rows, targets, label_smoothing=0.1))
    assert set(out) == {"lm", "loss"}


# ------------------------------------------------------------------------------ training
def test_short_overfit_lowers_all_three_losses(assets):
    model = make(assets, queue_size=4, momentum=0.9).train()
    pixels, ids, mask = batch(model)
    image_ids = torch.arange(4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    history = []
    for _ in range(40):
        out = model(pixels, ids, mask, image_ids=image_ids, alpha=0.4, generator=g)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in out.items()})
    for key in ("itc", "itm", "lm", "loss"):
        first = sum(h[key] for h in history[:3]) / 3
        last = sum(h[key] for h in history[-3:]) / 3
        assert last < 0.85 * first, (key, first, last)
    model.eval()
    assert model.generate(pixels, max_new_tokens=8, min_new_tokens=1)[0] == CAPTIONS[0]


def test_bad_batches_name_the_problem(assets):
    model = make(assets)
    pixels, ids, mask = batch(model)
    with pytest.raises(ValueError) as err:
        model(pixels[:3], ids, mask, image_ids=torch.tensor([0, -1, 2, 3]), objectives=("itc", "mlm"))
    message = str(err.value)
    assert "objectives" in message and "one caption (b, t) per image" in message and "image_ids" in message


# ------------------------------------------------------------------------------ generation
def test_cached_decoding_equals_full_recompute(assets):
    model = make(assets).eval()
    with torch.no_grad():  # a larger init so the untrained decoder's argmax depends on the image
        model.lm_head.dense.weight.mul_(20)
    pixels, _, _ = batch(model)
    captions = model.generate(pixels, num_beams=1, max_new_tokens=6, min_new_tokens=0)
    with torch.no_grad():
        kv = model.text_decoder.image_kv(model.embed_image(pixels))
        seqs = torch.cat([torch.tensor([model.config.dec_token_id]), model.prompt_ids]).expand(4, -1)
        for _ in range(6):
            causal = torch.ones(seqs.shape[1], seqs.shape[1], dtype=torch.bool).tril()
            hidden, _ = model.text_decoder(seqs, mask=causal, image_kv=kv)
            logits = model.lm_head(hidden[:, -1], model.text_decoder.embeddings.word.weight)
            seqs = torch.cat([seqs, logits.argmax(-1, keepdim=True)], dim=1)
    expected = []
    for row in seqs[:, 1 + model.prompt_ids.numel() :].tolist():
        row = row[: row.index(model.eos_token_id)] if model.eos_token_id in row else row
        expected.append(model.tokenizer.decode(row, skip_special_tokens=True).strip())
    assert captions == expected


def test_generate_settings(assets):
    model = make(assets).eval()
    pixels, _, _ = batch(model)
    beams = model.generate(pixels, num_beams=3, max_new_tokens=5, min_new_tokens=5)
    assert len(beams) == 4 and all(len(c.split()) >= 1 for c in beams)
    g = torch.Generator().manual_seed(0)
    sampled = model.generate(pixels, num_beams=1, top_p=0.9, max_new_tokens=5, generator=g)
    again = model.generate(pixels, num_beams=1, top_p=0.9, max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    assert sampled == again and len(sampled) == 4
    with pytest.raises(ValueError, match="nucleus sampling needs"):
        model.generate(pixels, num_beams=3, top_p=0.9)


# ------------------------------------------------------------------------------ checkpoints
def test_save_load_round_trip_gives_identical_outputs(assets, tmp_path):
    model = make(assets).train()
    pixels, ids, mask = batch(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # move every weight, the momentum encoders and the queue off their init
        out = model(pixels, ids, mask, image_ids=torch.arange(4))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["kind"] == "blip" and saved["parts"] == list(PARTS)
    assert (tmp_path / "ckpt" / "tokenizer" / "tokenizer.json").is_file()

    loaded = BlipModel.from_pretrained(tmp_path / "ckpt", need="train").eval()
    assert loaded.missing_parts == set()
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert loaded.text_decoder.layers[1].cross_attn is loaded.text_encoder.layers[1].cross_attn
    a = model(pixels, ids, mask, generator=torch.Generator().manual_seed(1))
    b = loaded(pixels, ids, mask, generator=torch.Generator().manual_seed(1))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    torch.testing.assert_close(model.itm_score(pixels, CAPTIONS), loaded.itm_score(pixels, CAPTIONS), rtol=0, atol=0)
    feats = model.encode_image(model.embed_image(pixels))[1]
    torch.testing.assert_close(feats, loaded.encode_image(loaded.embed_image(pixels))[1], rtol=0, atol=0)
    assert model.generate(pixels, max_new_tokens=6) == loaded.generate(pixels, max_new_tokens=6)
    assert loaded.tokenizer.convert_tokens_to_ids("[ENC]") == model.config.enc_token_id


def test_missing_parts_are_named(assets, tmp_path):
    model = make(assets).eval()
    pixels, _, _ = batch(model)
    model.save_pretrained(tmp_path / "captioner", parts=["vision", "text", "decoder"])

    with pytest.raises(CheckpointError, match=r"no \['itm'\] part \(itm: itm_head\.\*\)") as err:
        BlipModel.from_pretrained(tmp_path / "captioner", need="itm")
    assert "saved with parts ['vision', 'text', 'decoder']" in str(err.value)

    captioner = BlipModel.from_pretrained(tmp_path / "captioner", need="caption").eval()
    assert captioner.missing_parts == {"itc", "itm"}  # momentum was rebuilt from the online model
    assert captioner.generate(pixels, max_new_tokens=6) == model.generate(pixels, max_new_tokens=6)
    with pytest.raises(CheckpointError, match=r"without its \['itm'\] part.*'itm' needs"):
        captioner.itm_score(pixels, CAPTIONS)
    with pytest.raises(CheckpointError, match=r"without its \['itc'\] part"):
        captioner.encode_image(captioner.embed_image(pixels))
    for p, p_m in zip(captioner.vision.parameters(), captioner.vision_m.parameters()):
        assert torch.equal(p, p_m)
    with pytest.raises(ValueError, match=r"Cannot save parts \['itm'\]"):
        captioner.save_pretrained(tmp_path / "again", parts=["vision", "itm"])
    with pytest.raises(ValueError, match=r"Unknown parts \['heads'\]"):
        model.save_pretrained(tmp_path / "bad", parts=["heads"])

    config = json.loads((tmp_path / "captioner" / "config.json").read_text())
    (tmp_path / "captioner" / "config.json").write_text(json.dumps({**config, "kind": "qformer-stage1"}))
    with pytest.raises(CheckpointError, match="not a BLIP one"):
        BlipModel.from_pretrained(tmp_path / "captioner")


def test_retrieval_scores_take_a_blip_model(assets):
    model = make(assets)
    pixels, ids, mask = batch(model)
    with torch.no_grad():
        embeds = model.eval().embed_image(pixels)  # (4, n, d_v): what retrieval_scores calls image_embeds
        expected = model.itc_scores(model.encode_image(embeds)[1], model.encode_text(ids, mask)[1])
    scores = retrieval_scores(model, embeds, ids, mask, k_test=2)
    torch.testing.assert_close(scores["itc"], expected)
    assert (scores["itm_i2t"].isfinite().sum(dim=1) == 2).all()


# ------------------------------------------------------------------------------ BERT init
@pytest.fixture(scope="module")
def bert_dir(assets, tmp_path_factory):
    """A tiny random BertForMaskedLM over the test vocabulary, saved with its tokenizer."""
    directory = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer_dir"])
    tokenizer.save_pretrained(directory)
    torch.manual_seed(1)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=40,
    )  # fmt: skip
    mlm = BertForMaskedLM(config)
    with torch.no_grad():  # the head starts as zeros/ones; make it distinguishable
        for p in mlm.cls.predictions.parameters():
            p.normal_()
    mlm.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("share", [True, False])
def test_init_from_bert_gives_bert_text_encoder(assets, bert_dir, share):
    config = BlipConfig.from_bert(
        bert_dir, vision_name=assets["vit"], vision_width=32, embed_dim=16, queue_size=8, share_encoder_decoder=share
    )
    base_vocab = len(AutoTokenizer.from_pretrained(bert_dir))
    assert (config.num_layers, config.hidden_size, config.vocab_size) == (2, 32, base_vocab + 2)
    assert (config.dec_token_id, config.enc_token_id) == (base_vocab, base_vocab + 1)
    model = BlipModel(config, load_blip_tokenizer(bert_dir))
    cross = model.text_encoder.layers[1].cross_attn.k.weight.clone()
    report = init_from_bert(model, bert_dir)
    model.eval()

    # the unimodal encoder is BERT (token type 0 folded into the positions)
    bert = BertModel.from_pretrained(bert_dir).eval()
    ids, mask = model.tokenize(CAPTIONS)
    with torch.no_grad():
        ours, _ = model.text_encoder(ids, mask=masks.text_only_mask(mask))
        theirs = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], rtol=1e-4, atol=1e-5)

    enc, dec = model.text_encoder, model.text_decoder
    for e, d in zip(enc.layers, dec.layers):  # the decoder's self-attention also starts as BERT's
        assert torch.equal(e.self_attn.q.weight, d.self_attn.q.weight) and e.self_attn is not d.self_attn
        assert torch.equal(e.ffn.fc1.weight, d.ffn.fc1.weight)
    assert (dec.embeddings is enc.embeddings) == share
    assert torch.equal(model.text_encoder.layers[1].cross_attn.k.weight, cross)  # left fresh
    assert "text_encoder.layers.1.cross_attn.k.weight" in report.missing
    assert "itm_head.weight" in report.missing and "lm_head.dense.weight" in report.loaded
    for p, p_m in zip(model.text_encoder.parameters(), model.text_encoder_m.parameters()):
        assert torch.equal(p, p_m)  # momentum copied after the load

    wrong = BlipConfig.from_bert(bert_dir, vision_name=assets["vit"], vision_width=32, num_layers=3)
    with pytest.raises(CheckpointError, match="`num_layers` is 3, the checkpoint's num_hidden_layers is 2"):
        init_from_bert(BlipModel(wrong, load_blip_tokenizer(bert_dir)), bert_dir)


# ------------------------------------------------------------------------------ config
def test_presets_and_config_errors(assets):
    base = BlipConfig.from_name("blip_base")
    assert (base.num_layers, base.hidden_size, base.num_heads, base.intermediate_size) == (12, 768, 12, 3072)
    assert (base.vocab_size, base.dec_token_id, base.enc_token_id) == (30524, 30522, 30523)
    assert (base.queue_size, base.embed_dim, base.momentum, base.alpha) == (57600, 256, 0.995, 0.4)
    assert (base.label_smoothing, base.init_temp, base.temp_min, base.temp_max) == (0.1, 0.07, 0.001, 0.5)
    assert (base.vision_name, base.vision_width, base.share_encoder_decoder) == ("ViT-B-16", 768, True)
    assert BlipConfig.from_dict(base.to_dict()) == base

    with pytest.raises(ValueError) as err:
        BlipConfig.from_name("tiny", num_heads=5, momentum=1.5, temp_max=0.01)
    message = str(err.value)
    assert "`hidden_size` (32) must be divisible by `num_heads` (5)" in message
    assert "`momentum` must be in [0, 1)" in message and "temp_max" in message
    with pytest.raises(ValueError, match="Unknown BLIP preset 'large'"):
        BlipConfig.from_name("large")
    with pytest.raises(ValueError, match="vision_name is not set"):
        BlipModel(BlipConfig.from_name("tiny").with_tokenizer(assets["tokenizer"]), assets["tokenizer"])
    with pytest.raises(ValueError, match="the tokenizer gives dec_token_id=") as err:
        BlipModel(BlipConfig.from_name("tiny", vision_name=assets["vit"]), assets["tokenizer"])
    assert "config.with_tokenizer(tokenizer)" in str(err.value)
