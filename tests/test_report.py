"""The demo's HTML report and the query attention maps it shows."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from qformer.config import QFormerConfig
from qformer.model import QFormer
from qformer.report import _axis, attention_maps, render_report


def _images(tmp_path, n=4):
    colours = ["red", "blue", "green", "yellow", "purple", "orange"]
    paths = []
    for i in range(n):
        img = Image.new("RGB", (64, 64), "black")
        ImageDraw.Draw(img).ellipse((8 + i, 8, 40 + i, 40), fill=colours[i % len(colours)])
        p = tmp_path / "samples" / f"img{i}.png"
        p.parent.mkdir(exist_ok=True)
        img.save(p)
        paths.append(p)
    return paths


def _inputs(tmp_path):
    paths = _images(tmp_path)
    metrics = {
        "retrieval": {"itc": {"i2t_r1": 0.123456, "t2i_r1": 0.5}, "itm": {"i2t_r1": 0.75}},
        "caption": {"bleu4": 0.4567, "cider": 1.23456, "exact_match": 0.25},
        "vqa": {"accuracy": 0.875, "by_type": {"color": 0.9, "count": 0.5}},
        "ablation": {"without_stage1": {"caption": {"cider": 0.3333333}}},
        "seconds": {"data": 1.5, "backbones": 2.25, "stage1": 123.4567},
        "mystery_key": {"deep": {"deeper": 7}},
        "num_images": 512,
    }
    captions = [
        {"image": str(paths[0]), "caption": "a red circle", "references": ["a red circle"], "correct": True},
        {"image": "samples/img1.png", "caption": "a <b>blue</b> circle & more",  # out_dir-relative
         "references": [], "correct": False},
        {"image": paths[2], "caption": "something", "references": ["x"], "correct": None},
    ]
    vqa = [
        {"image": paths[0], "question": "what <colour> is it?", "answer": "red", "truth": "red"},
        {"image": paths[1], "question": "how many shapes?", "answer": "two", "truth": "one"},
    ]
    retrieval = [
        {"query": "a green circle", "images": [str(p) for p in paths] + [str(paths[0])],
         "hits": [False, False, True, False, False]},
    ]  # fmt: skip
    curves = {
        "stage 1": [
            {"step": s, "loss": 3.0 / (s + 1), "itc": 1.0 / (s + 1), "itm": 0.7, "itg": 1.3 - 0.1 * s,
             "lr": 1e-4, "samples_per_s": 900.0}
            for s in range(10)
        ],
        "stage 2": [{"step": 5, "loss": 2.5}],  # a single point
        "constant": [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 1.0}, {"step": 2, "loss": 1.0}],
    }
    attention = [
        {"image": paths[0], "maps": np.random.default_rng(0).random((3, 4, 4))},
        {"image": str(paths[1]), "maps": torch.rand(3, 4, 4)},
    ]
    return {"metrics": metrics, "captions": captions, "vqa": vqa, "retrieval": retrieval,
            "curves": curves, "attention": attention}  # fmt: skip


def test_report_is_self_contained_and_complete(tmp_path):
    path = render_report(tmp_path, title="demo <run>", **_inputs(tmp_path))
    assert path == tmp_path / "report.html" and path.exists()
    text = path.read_text(encoding="utf-8")

    # self-contained: no external resources, no scripts; images are embedded PNGs
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*https?://', text)
    assert "<script" not in text.lower()
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)

    # text is escaped
    assert "demo &lt;run&gt;" in text
    assert "a &lt;b&gt;blue&lt;/b&gt; circle &amp; more" in text and "<b>blue</b>" not in text
    assert "what &lt;colour&gt; is it?" in text

    # metrics: flattened, floats to 3 decimals, unknown keys and the seconds table present
    for needle in ["0.123", "1.235", "0.333", "0.875", "123.457", "2.250", "512", "mystery_key",
                   "deep / deeper", "itc / i2t_r1", "without_stage1 / caption / cider",
                   "seconds"]:  # fmt: skip
        assert needle in text, needle
    assert "0.123456" not in text

    # sections appear in the required order
    order = [text.index(f'<section id="{s}">') for s in
             ("metrics", "captions", "vqa", "retrieval", "curves", "attention")]  # fmt: skip
    assert order == sorted(order)

    # correctness markers: 1 green caption + 1 green answer + retrieval hit; 1 red caption, 1 red answer
    assert text.count('class="card good"') == 2 and text.count('class="card bad"') == 2
    assert text.count('class="thumb hit"') == 1 and text.count('class="thumb miss"') == 4

    # one chart per curve, one line per numeric key (not step / lr / samples_per_s)
    assert text.count("<svg") == 3
    stage1 = text[text.index('aria-label="stage 1"') :].split("</svg>")[0]
    assert stage1.count("<polyline") == 4
    for key in ("loss (", "itc (", "itm (", "itg ("):
        assert key in stage1
    assert "lr (" not in stage1 and "samples_per_s" not in stage1
    svgs = "".join(re.findall(r"<svg.*?</svg>", text))
    svg_numbers = re.findall(r'(?:points|x|y|x1|y1|x2|y2|cx|cy)="([^"]*)"', svgs)
    assert svg_numbers and not any("nan" in v or "inf" in v for v in svg_numbers)

    # one heatmap per query per attention entry, labelled
    assert text.count('class="px heatmap"') == 2 * 3
    assert "query 0" in text and "query 2" in text

    # sample images are upscaled to 128 px with NEAREST (a 64 px image doubles)
    import base64
    import io

    first = Image.open(io.BytesIO(base64.b64decode(srcs[0].split(",", 1)[1])))
    assert first.size == (128, 128)


def test_empty_sections_are_omitted(tmp_path):
    path = render_report(
        tmp_path, metrics={}, captions=[], vqa=[], retrieval=[], curves={"stage 1": []}, attention=[]
    )
    text = path.read_text()
    assert "<section" not in text and "<svg" not in text and "<img" not in text
    assert text.count('class="note omitted"') == 6

    inputs = _inputs(tmp_path)
    path = render_report(tmp_path, **{**inputs, "vqa": [], "attention": []})
    text = path.read_text()
    assert '<section id="vqa">' not in text and '<section id="attention">' not in text
    assert '<section id="captions">' in text and text.count('class="note omitted"') == 2


def test_curves_edge_cases(tmp_path):
    curves = {
        "one": [{"step": 0, "loss": 0.0}],
        "flat": [{"step": 3, "loss": 5.0}, {"step": 4, "loss": 5.0}],
        "with gaps": [{"step": 0, "loss": 1.0, "itm": None}, {"step": 1, "loss": float("nan")},
                      {"step": 2, "loss": 0.5, "itm": 0.2}],
        "no numbers": [{"step": 0, "note": "x"}],
    }
    text = render_report(tmp_path, metrics={}, captions=[], vqa=[], retrieval=[], curves=curves,
                         attention=[]).read_text()  # fmt: skip
    assert text.count("<svg") == 4
    coords = [float(c) for c in re.findall(r'c[xy]="([-0-9.]+)"', text)]
    assert coords and all(math.isfinite(c) for c in coords)
    for lo, hi in [(1.0, 1.0), (0.0, 0.0), (-3.0, -3.0), (0.1, 0.1000001), (2.0, 1000.0)]:
        a, b, ticks, _ = _axis(lo, hi)
        assert a < b and a <= lo and b >= hi and len(ticks) >= 2


def test_missing_image_does_not_crash(tmp_path):
    text = render_report(
        tmp_path, metrics={"x": 1.0}, captions=[{"image": "nope.png", "caption": "c", "correct": None}],
        vqa=[], retrieval=[], curves={}, attention=[{"image": "nope.png", "maps": [[[0.1, 0.9]]]}],
    ).read_text()  # fmt: skip
    assert "missing image" in text and text.count('class="px heatmap"') == 1


# --- attention_maps -------------------------------------------------------------------------


def _manual(qformer, layer_idx, tokens):
    """Brute force: run the layers by hand up to `layer_idx`'s cross-attention, then one head at a
    time softmax(q k^T / sqrt(hs)) from the raw weights."""
    cfg = qformer.config
    b = tokens.shape[0]
    x = qformer.embeddings(None, qformer.query_tokens.expand(b, -1, -1))
    kvs = qformer.image_kv(tokens)
    for i in range(layer_idx):
        x, _ = qformer.layers[i](
            x, num_queries=cfg.num_query_tokens, mask=None, image_kv=kvs[i], past_kv=None
        )
    x, _ = qformer.layers[layer_idx].self_attn(x)
    m = qformer.layers[layer_idx].cross_attn
    hs = cfg.hidden_size // cfg.num_heads
    q = x @ m.q.weight.T + m.q.bias  # (b, q, d)
    k = tokens @ m.k.weight.T + m.k.bias  # (b, n, d)
    probs = torch.zeros(b, cfg.num_query_tokens, tokens.shape[1])
    for h in range(cfg.num_heads):
        s = q[..., h * hs : (h + 1) * hs] @ k[..., h * hs : (h + 1) * hs].transpose(1, 2) / math.sqrt(hs)
        probs += torch.softmax(s, dim=-1) / cfg.num_heads
    return probs


@torch.no_grad()
def test_attention_maps_match_manual_with_class_token():
    cfg = QFormerConfig.from_name("tiny")
    assert cfg.vision_width == 24
    model = QFormer(cfg).train()  # attention_maps must switch dropout off and restore the mode
    tokens = torch.randn(2, 1 + 4, 24)
    maps = attention_maps(model, tokens, grid=(2, 2))
    assert model.training
    assert maps.shape == (2, cfg.num_query_tokens, 2, 2)
    model.eval()
    expected = _manual(model, 0, tokens)  # tiny: only layer 0 cross-attends
    torch.testing.assert_close(maps, expected[..., 1:].reshape(2, -1, 2, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(maps.sum((-1, -2)), 1 - expected[..., 0], atol=1e-5, rtol=1e-5)
    assert (maps.sum((-1, -2)) < 1).all()
    torch.testing.assert_close(attention_maps(model, tokens, layer=0, grid=(2, 2)), maps)


@torch.no_grad()
def test_attention_maps_without_class_token_sum_to_one():
    model = QFormer(QFormerConfig.from_name("tiny")).eval()
    tokens = torch.randn(3, 6, 24)
    maps = attention_maps(model, tokens, grid=(2, 3))
    assert maps.shape == (3, 4, 2, 3)
    torch.testing.assert_close(maps.sum((-1, -2)), torch.ones(3, 4))
    assert (maps >= 0).all()


@torch.no_grad()
def test_attention_maps_default_is_last_cross_attention_layer():
    cfg = QFormerConfig.from_name("tiny", cross_attention_freq=1)  # both layers cross-attend
    model = QFormer(cfg).eval()
    tokens = torch.randn(2, 1 + 4, 24)
    default = attention_maps(model, tokens, grid=(2, 2))
    torch.testing.assert_close(default, _manual(model, 1, tokens)[..., 1:].reshape(2, -1, 2, 2),
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    first = attention_maps(model, tokens, layer=0, grid=(2, 2))
    torch.testing.assert_close(first, _manual(model, 0, tokens)[..., 1:].reshape(2, -1, 2, 2),
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    assert not torch.allclose(default, first)
    # no hooks are left behind
    assert all(not layer.cross_attn._forward_hooks for layer in model.layers)


def test_attention_maps_errors():
    model = QFormer(QFormerConfig.from_name("tiny"))
    tokens = torch.randn(1, 5, 24)
    with pytest.raises(ValueError, match="no cross-attention"):
        attention_maps(model, tokens, layer=1, grid=(2, 2))  # tiny's layer 1 has none
    with pytest.raises(ValueError, match="fewer than"):
        attention_maps(model, tokens, grid=(3, 3))


def test_attention_maps_feed_the_report(tmp_path):
    model = QFormer(QFormerConfig.from_name("tiny")).eval()
    maps = attention_maps(model, torch.randn(1, 5, 24), grid=(2, 2))
    (path,) = _images(tmp_path, 1)
    text = render_report(tmp_path, metrics={}, captions=[], vqa=[], retrieval=[], curves={},
                         attention=[{"image": path, "maps": maps[0]}]).read_text()  # fmt: skip
    assert text.count('class="px heatmap"') == 4
