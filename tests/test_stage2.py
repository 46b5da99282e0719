"""Stage 2 end to end on tiny saved backbones: an open_clip ViT and four LLM families."""

import warnings

import pytest
import torch
from tiny_models import LLM_FAMILIES, save_llm, save_open_clip_vit

from bridges.language import LanguageBridge
from bridges.vision import VisionBridge
from qformer import QFormerConfig, Stage1Model
from qformer.checkpoint import CheckpointError
from qformer.stage2 import Stage2Model, text_only_prefixes

WIDTH = 32  # the tiny ViT's token width
CFG = QFormerConfig.from_name("tiny", vision_width=WIDTH, hidden_dropout=0.0, attention_dropout=0.0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stage2")
    paths = {family: save_llm(family, tmp / family) for family in LLM_FAMILIES}
    paths["vit"] = save_open_clip_vit(tmp / "vit")
    stage1 = Stage1Model(CFG)
    stage1.save_pretrained(tmp / "stage1")
    paths["stage1"] = tmp / "stage1"
    return paths


def build(saved, family: str) -> Stage2Model:
    name, weights = saved["vit"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2 / Llama: no pad token
        language = LanguageBridge.from_pretrained(saved[family])
    model = Stage2Model(CFG, vision=VisionBridge.from_open_clip(name, weights), language=language)
    model.load_stage1(saved["stage1"])
    return model


def pixels(b=3):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(0))


CAPTIONS = ["a cat sits on the mat", "two dogs play in the park", "a red ball"]


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_only_the_qformer_ln_vision_and_projection_train(saved, family):
    model = build(saved, family)
    model.train()
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("vision.", "language."))}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    loss = model(CAPTIONS, pixel_values=pixels())["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()

    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable  # every trainable weight learns, nothing else does
    assert all(n.startswith(("ln_vision.", "qformer.", "proj.")) for n in trainable)
    assert {"qformer.query_tokens", "proj.weight", "ln_vision.weight"} <= trainable
    assert not any(n.startswith(text_only_prefixes(CFG)) for n in trainable)  # text parts unused
    for k, v in model.state_dict().items():
        if k in frozen_before:
            assert torch.equal(v, frozen_before[k]), k
    assert not model.vision.training and not model.language.model.training


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_generate_captions_and_answers_for_a_batch(saved, family):
    model = build(saved, family).eval()
    captions = model.generate(pixel_values=pixels(), num_beams=2, max_new_tokens=5)
    prompted = model.generate(pixel_values=pixels(), prompts=["a photo of"] * 3, num_beams=1, max_new_tokens=5)
    answers = model.answer(["what colour is it?"] * 3, pixel_values=pixels(), max_new_tokens=4)
    for out in (captions, prompted, answers):
        assert len(out) == 3 and all(isinstance(s, str) for s in out)


def test_load_stage1_reports_what_it_did_not_use(saved):
    name, weights = saved["vit"]
    model = Stage2Model(CFG, vision=VisionBridge.from_open_clip(name, weights), language=LanguageBridge.from_pretrained(saved["opt"]))
    stage1 = Stage1Model.from_pretrained(saved["stage1"])
    report = model.load_stage1(saved["stage1"])
    assert {"vision_proj.weight", "text_proj.weight", "itm_head.weight", "lm_head.bias", "temp"} <= set(report.skipped)
    assert report.missing == ["proj.weight", "proj.bias"]
    assert torch.equal(model.qformer.query_tokens, stage1.qformer.query_tokens)
    assert torch.equal(model.ln_vision.weight, stage1.ln_vision.weight)


def test_stage1_of_another_width_names_both_sizes(saved, tmp_path):
    Stage1Model(CFG.replace(hidden_size=48, num_heads=4)).save_pretrained(tmp_path / "wide")
    model = build(saved, "opt")
    with pytest.raises(CheckpointError, match="hidden_size: stage-1 checkpoint 48 vs this model 32"):
        model.load_stage1(tmp_path / "wide")
    # built from the checkpoint's own config, the same checkpoint loads
    wide, report = Stage2Model.from_stage1(tmp_path / "wide", language=model.language, vision=model.vision)
    assert wide.qformer.config.hidden_size == 48 and wide.proj.in_features == 48 and report.ok is False
    assert report.missing == ["proj.weight", "proj.bias"]


def test_vision_tower_of_another_width_names_both(saved):
    name, weights = saved["vit"]
    with pytest.raises(ValueError, match="32 wide.*vision_width=24"):
        Stage2Model(QFormerConfig.from_name("tiny"), vision=VisionBridge.from_open_clip(name, weights),
                    language=LanguageBridge.from_pretrained(saved["opt"]))


def test_a_stage1_checkpoint_is_not_a_stage2_one(saved):
    with pytest.raises(CheckpointError, match="not a stage-2"):
        Stage2Model.from_pretrained(saved["stage1"])


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_save_and_reload_gives_the_same_model(saved, family, tmp_path):
    model = build(saved, family).eval()
    with torch.no_grad():
        model.proj.weight.normal_()  # something that differs from a fresh init
    model.save_pretrained(tmp_path / "s2")
    again = Stage2Model.from_pretrained(tmp_path / "s2").eval()
    torch.testing.assert_close(again.soft_prompt(pixel_values=pixels()), model.soft_prompt(pixel_values=pixels()))
    greedy = dict(num_beams=1, max_new_tokens=6)
    assert again.generate(pixel_values=pixels(), **greedy) == model.generate(pixel_values=pixels(), **greedy)


def test_cached_tokens_give_the_same_loss_as_pixels(saved):
    model = build(saved, "opt").eval()
    tokens = model.vision(pixels())
    a = model(CAPTIONS, pixel_values=pixels())["loss"]
    b = model(CAPTIONS, image_tokens=tokens)["loss"]
    torch.testing.assert_close(a, b)
