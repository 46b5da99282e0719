"""The stage-1 model: reuse of image K/V and the query cache, gradient flow, bad input."""

import pytest
import torch
from torch import nn

from qformer import QFormer, QFormerConfig, Stage1Model, masks
from qformer.checkpoint import CheckpointError

CFG = QFormerConfig.from_name("tiny", hidden_dropout=0.0, attention_dropout=0.0)


def batch(b=4, n=7, t=6, cfg=CFG, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, n, cfg.vision_width, generator=g)
    ids = torch.randint(1, cfg.vocab_size - 1, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, t - 2 :] = 0
    mask[2, t - 1 :] = 0
    ids = ids.masked_fill(mask == 0, cfg.pad_token_id)
    return image, ids, mask


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_reuse_leaves_every_loss_and_gradient_unchanged():
    fast = Stage1Model(CFG, itm_negatives="hardest")
    slow = Stage1Model(CFG, itm_negatives="hardest", reuse_image_kv=False, reuse_query_cache=False)
    slow.load_state_dict(fast.state_dict())
    image, ids, mask = batch()
    out_fast, out_slow = fast(image, ids, mask), slow(image, ids, mask)
    for key in ("itc", "itm", "itg", "loss"):
        torch.testing.assert_close(out_fast[key], out_slow[key], rtol=1e-5, atol=1e-6)
    out_fast["loss"].backward()
    out_slow["loss"].backward()
    g_fast, g_slow = grads(fast), grads(slow)
    assert g_fast.keys() == g_slow.keys() and len(g_fast) == len(list(fast.parameters()))
    for name in g_fast:
        torch.testing.assert_close(g_fast[name], g_slow[name], rtol=1e-4, atol=1e-6, msg=name)


def test_last_layer_pruning_leaves_every_loss_and_gradient_unchanged(monkeypatch):
    """The ITM pass computes only the queries' last-layer rows and the ITC text pass only [CLS]'s:
    against the same model with every pass computing every row, the losses and gradients agree."""
    pruned = Stage1Model(CFG, itm_negatives="hardest")
    full = Stage1Model(CFG, itm_negatives="hardest")
    full.load_state_dict(pruned.state_dict())
    image, ids, mask = batch()
    out_pruned = pruned(image, ids, mask)
    out_pruned["loss"].backward()
    calls = []
    forward = QFormer.forward

    def every_row(self, **kwargs):
        calls.append(kwargs.pop("outputs", "all"))
        return forward(self, **kwargs)

    monkeypatch.setattr(QFormer, "forward", every_row)
    out_full = full(image, ids, mask)
    out_full["loss"].backward()
    assert sorted(calls) == ["all", "all", "first", "queries"]  # query pass, ITG, ITC text, ITM
    for key in ("itc", "itm", "itg", "loss"):
        torch.testing.assert_close(out_pruned[key], out_full[key], rtol=1e-5, atol=1e-6)
    g_pruned, g_full = grads(pruned), grads(full)
    assert g_pruned.keys() == g_full.keys()
    for name in g_pruned:
        torch.testing.assert_close(g_pruned[name], g_full[name], rtol=1e-4, atol=1e-6, msg=name)


def test_pruned_passes_give_the_full_pass_rows():
    qf = QFormer(CFG).eval()
    image, ids, mask = batch()
    m = masks.bidirectional_mask(CFG.num_query_tokens, mask)
    full = qf(input_ids=ids, mask=m, image_embeds=image)
    queries = qf(input_ids=ids, mask=m, image_embeds=image, outputs="queries")
    assert queries.hidden_states.shape == (4, CFG.num_query_tokens, CFG.hidden_size)
    assert queries.text_output.shape[1] == 0
    torch.testing.assert_close(queries.query_output, full.query_output)
    text = qf(input_ids=ids, mask=masks.text_only_mask(mask), use_queries=False)
    cls = qf(input_ids=ids, mask=masks.text_only_mask(mask), use_queries=False, outputs="first")
    assert cls.hidden_states.shape == (4, 1, CFG.hidden_size)
    torch.testing.assert_close(cls.text_output, text.text_output[:, :1])
    model = Stage1Model(CFG).eval()
    torch.testing.assert_close(model.text_features(ids, mask), model.encode_text(ids, mask)[1])
    with pytest.raises(ValueError, match="needs a pass with queries"):
        qf(input_ids=ids, mask=masks.text_only_mask(mask), use_queries=False, outputs="queries")
    with pytest.raises(ValueError, match="'all', 'queries' or 'first'"):
        qf(image_embeds=image, outputs="text")
    with pytest.raises(ValueError, match="text-only pass"):
        qf(input_ids=ids, mask=m, image_embeds=image, outputs="first")


def test_pruned_pass_keeps_the_query_cache_and_the_cached_text_rows():
    qf = QFormer(CFG).eval()
    image, ids, mask = batch()
    full = qf(image_embeds=image, return_cache=True)
    pruned = qf(image_embeds=image, return_cache=True, outputs="queries")
    for (k1, v1), (k2, v2) in zip(full.query_cache, pruned.query_cache):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    # ITG on the cache (text rows only): "first" gives the full pass's first text row
    m = masks.multimodal_causal_mask(CFG.num_query_tokens, mask, text_rows_only=True)
    text = qf(input_ids=ids, mask=m, use_queries=False, past_kv=full.query_cache)
    first = qf(input_ids=ids, mask=m, use_queries=False, past_kv=full.query_cache, outputs="first")
    torch.testing.assert_close(first.text_output, text.text_output[:, :1])


def test_itg_loss_reaches_queries_and_cross_attention_through_the_cache():
    model = Stage1Model(CFG)
    image, ids, mask = batch()
    model(image, ids, mask)["itg"].backward()
    assert model.qformer.query_tokens.grad.abs().sum() > 0
    for i in model.qformer.cross_attention_layers:
        assert model.qformer.layers[i].cross_attn.k.weight.grad.abs().sum() > 0
    assert model.ln_vision.weight.grad.abs().sum() > 0
    # ITG does not use the ITC/ITM heads
    assert model.itm_head.weight.grad is None and model.vision_proj.weight.grad is None


def test_no_loss_reaches_the_frozen_tower():
    tower = nn.Linear(5, CFG.vision_width).requires_grad_(False)
    before = tower.weight.clone()
    model = Stage1Model(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _, ids, mask = batch()
    pixels = torch.randn(4, 7, 5)
    model(tower(pixels), ids, mask)["loss"].backward()
    opt.step()
    assert tower.weight.grad is None
    assert torch.equal(tower.weight, before)


def test_text_pass_never_sees_the_image():
    model = Stage1Model(CFG).eval()
    _, ids, mask = batch()
    h1, f1 = model.encode_text(ids, mask)
    # the text-only pass takes no image at all; the ITM pass's *text* rows see the image only
    # through the queries: with queries masked out as keys for text, text outputs ignore the image
    m = masks.bidirectional_mask(CFG.num_query_tokens, mask).clone()
    m[:, :, CFG.num_query_tokens :, : CFG.num_query_tokens] = False
    img_a, img_b = torch.randn(4, 7, 24), torch.randn(4, 7, 24)
    out_a = model.qformer(input_ids=ids, mask=m, image_embeds=img_a).text_output
    out_b = model.qformer(input_ids=ids, mask=m, image_embeds=img_b).text_output
    torch.testing.assert_close(out_a, out_b)
    assert h1.shape == (4, 6, CFG.hidden_size) and f1.shape == (4, CFG.embed_dim)


def test_cross_attention_layers_and_query_init():
    cfg = QFormerConfig.from_name("blip2", num_layers=5, cross_attention_freq=2)
    q = QFormer(cfg)
    assert q.cross_attention_layers == [0, 2, 4]
    assert q.layers[0].cross_attn.k.weight.shape == (768, 1408)
    std = q.query_tokens.std().item()
    assert 0.018 < std < 0.022  # normal(0, 0.02), never zeros


def test_padding_does_not_change_real_tokens():
    model = Stage1Model(CFG).eval()
    image, ids, mask = batch(b=3)
    image, short_ids, short_mask = image[:1], ids[:1, :4], mask[:1, :4]
    padded_ids = torch.cat([short_ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([short_mask, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    a = model.itm_logits(image, short_ids, short_mask)
    b = model.itm_logits(image, padded_ids, padded_mask)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_image_ids_in_the_batch():
    model = Stage1Model(CFG)
    image, ids, mask = batch()
    out = model(image, ids, mask, image_ids=torch.tensor([0, 0, 1, 2]))
    assert all(torch.isfinite(v) for v in out.values())


def test_negative_pool_keeps_the_last_items_and_pads_their_text():
    from qformer.stage1 import NegativePool

    pool = NegativePool(5)
    for k, t in ((3, 4), (3, 6), (2, 5)):  # 8 items pushed, texts of three lengths
        pool.push(tokens=torch.full((k, 2, 3), float(t)), input_ids=torch.full((k, t), 7), text_mask=torch.ones(k, t),
                  image_ids=torch.arange(k) + 10 * t, image_feats=torch.zeros(k, 2, 4), text_feats=torch.zeros(k, 4),
                  pad_token_id=0)  # fmt: skip
    assert len(pool) == 5
    assert pool.image_ids.tolist() == [60, 61, 62, 50, 51]
    assert pool.input_ids.shape == (5, 6) and pool.text_mask.shape == (5, 6)
    assert pool.input_ids[3].tolist() == [7] * 5 + [0] and pool.text_mask[3].tolist() == [1] * 5 + [0]
    assert pool.tokens[:, 0, 0].tolist() == [6, 6, 6, 5, 5]


def test_itm_with_a_negative_pool_equals_the_loss_by_hand():
    # pool of one item: batch 1 holds images X, Y (Y is what the pool keeps); batch 2 holds two
    # captions of one image group, so its only possible ITM negative is Y, text and image
    torch.manual_seed(0)
    model = Stage1Model(CFG, itm_negative_pool=1).train()
    image1, ids1, mask1 = (x[:2] for x in batch(b=3, t=5, seed=1))
    model(image1, ids1, mask1, image_ids=torch.tensor([0, 1]))
    assert len(model.negative_pool) == 1 and model.negative_pool.image_ids.tolist() == [1]
    image2, ids2, mask2 = (x[:2] for x in batch(b=3, t=7, seed=2))
    out = model(image2, ids2, mask2, image_ids=torch.tensor([5, 5]))

    def padded(x, t):
        return torch.cat([x, torch.zeros(x.shape[0], t - x.shape[1], dtype=x.dtype)], dim=1)

    y_ids, y_mask = padded(ids1[1:], 7).expand(2, 7), padded(mask1[1:], 7).expand(2, 7)
    y_img = image1[1:].expand(2, -1, -1)
    logits = torch.cat([
        model.itm_logits(image2, ids2, mask2),  # positives
        model.itm_logits(y_img, ids2, mask2),  # (negative image, text)
        model.itm_logits(image2, y_ids, y_mask),  # (image, negative text)
    ])  # fmt: skip
    by_hand = torch.nn.functional.cross_entropy(logits, torch.tensor([1, 1, 0, 0, 0, 0]))
    torch.testing.assert_close(out["itm"], by_hand, rtol=1e-5, atol=1e-6)
    out["itm"].backward()  # the pool image's LayerNorm path carries gradient too
    assert model.ln_vision.weight.grad.abs().sum() > 0
    # without the pool the same batch has no negative at all
    with pytest.raises(ValueError, match="two distinct images"):
        Stage1Model(CFG)(image2, ids2, mask2, image_ids=torch.tensor([5, 5]))


def test_negative_pool_is_off_in_eval_and_needs_image_ids():
    model = Stage1Model(CFG, itm_negative_pool=4)
    image, ids, mask = batch()
    with pytest.raises(ValueError, match="needs `image_ids`"):
        model(image, ids, mask)
    model.eval()(image, ids, mask)
    assert len(model.negative_pool) == 0


# ---------------------------------------------------------------- bad input
def test_wrong_image_width_is_named():
    model = Stage1Model(CFG)
    _, ids, mask = batch()
    with pytest.raises(ValueError, match=r"vision_width.*\(4, 7, 30\)|\(4, 7, 30\).*vision_width"):
        model(torch.randn(4, 7, 30), ids, mask)


def test_text_longer_than_position_table():
    model = Stage1Model(CFG)
    t = CFG.max_position_embeddings + 1
    ids = torch.ones(4, t, dtype=torch.long)
    with pytest.raises(ValueError, match=f"{t} tokens.*max_position_embeddings={CFG.max_position_embeddings}"):
        model(torch.randn(4, 7, 24), ids, torch.ones_like(ids))


def test_token_ids_out_of_vocab():
    model = Stage1Model(CFG)
    ids = torch.full((4, 5), CFG.vocab_size + 3)
    with pytest.raises(ValueError, match="vocab_size"):
        model.encode_text(ids, torch.ones_like(ids))


def test_batch_mismatch():
    model = Stage1Model(CFG)
    image, ids, mask = batch()
    with pytest.raises(ValueError, match="one caption per image"):
        model(image[:3], ids, mask)


def test_checkpoint_round_trip_and_wrong_shapes(tmp_path):
    model = Stage1Model(CFG)
    model.save_pretrained(tmp_path / "a")
    loaded = Stage1Model.from_pretrained(tmp_path / "a")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    wider = Stage1Model(QFormerConfig.from_name("tiny", embed_dim=8))
    with pytest.raises(CheckpointError, match=r"vision_proj.weight: .*\(16, 32\) vs model \(8, 32\)"):
        from qformer.checkpoint import load_state_dict_strict

        load_state_dict_strict(wider, model.state_dict(), source="ckpt")


def test_checkpoint_unexpected_and_missing_keys_are_named(tmp_path):
    from qformer.checkpoint import load_state_dict_strict

    model = Stage1Model(CFG)
    sd = dict(model.state_dict())
    sd["itm_head.extra"] = torch.zeros(1)
    del sd["text_proj.bias"]
    with pytest.raises(CheckpointError) as err:
        load_state_dict_strict(model, sd)
    assert "itm_head.extra" in str(err.value) and "text_proj.bias" in str(err.value)


def test_missing_checkpoint_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Stage1Model.from_pretrained(tmp_path)


def test_loss_weights_scale_only_the_summed_loss():
    plain = Stage1Model(CFG, itm_negatives="hardest")
    weighted = Stage1Model(CFG, itm_negatives="hardest", loss_weights={"itc": 0.5, "itm": 3})
    weighted.load_state_dict(plain.state_dict())
    image, ids, mask = batch()
    a, b = plain(image, ids, mask), weighted(image, ids, mask)
    for key in ("itc", "itm", "itg"):  # the logged losses stay unweighted
        torch.testing.assert_close(a[key], b[key])
    torch.testing.assert_close(b["loss"], 0.5 * a["itc"] + 3 * a["itm"] + a["itg"])
    assert weighted.loss_weights == {"itc": 0.5, "itm": 3.0, "itg": 1.0}


def test_an_objective_at_weight_zero_trains_nothing_of_its_own():
    model = Stage1Model(CFG, loss_weights={"itc": 0})
    model(*batch())["loss"].backward()
    # text_proj and the temperature serve ITC alone
    assert torch.count_nonzero(model.text_proj.weight.grad) == 0 and model.temp.grad == 0
    assert torch.count_nonzero(model.itm_head.weight.grad) > 0


@pytest.mark.parametrize(
    "weights, match",
    [
        ({"itx": 1}, r"unknown objectives \['itx'\]"),
        ({"itm": -1}, r"loss_weights.itm.*>= 0, got -1"),
        ({"itg": float("nan")}, r"loss_weights.itg.*finite"),
        ({"itc": "3"}, r"loss_weights.itc.*got '3'"),
        ({"itc": 0, "itm": 0, "itg": 0}, "every objective to 0"),
    ],
)
def test_bad_loss_weights_are_named(weights, match):
    with pytest.raises(ValueError, match=match):
        Stage1Model(CFG, loss_weights=weights)


def test_loss_weights_round_trip_through_the_checkpoint(tmp_path):
    Stage1Model(CFG, loss_weights={"itm": 3}).save_pretrained(tmp_path / "w")
    assert Stage1Model.from_pretrained(tmp_path / "w").loss_weights == {"itc": 1.0, "itm": 3.0, "itg": 1.0}
