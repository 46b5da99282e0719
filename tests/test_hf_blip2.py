"""`qformer export --format hf-blip2` and `qformer import --from hf-blip2`, on tiny saved models.

(a) The exported tiny OPT and T5 stage-2 models, loaded by `Blip2ForConditionalGeneration` and fed
    by the exported `Blip2Processor`, decode the same greedy tokens as our `Stage2Model.generate`;
    the exported vision tower gives our bridge + ln_vision tokens.
(b) transformers -> ours -> transformers leaves every tensor equal; ours -> transformers -> ours
    captions the same.
(c) Towers and directories that cannot be converted fail, naming why, and write nothing.
"""

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import build as build_llm
from tiny_models import save_llm, save_open_clip_vit
from torch import nn
from torch.testing import assert_close
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    Blip2VisionModel,
    CLIPVisionConfig,
    CLIPVisionModel,
)

from bridges.language import LanguageBridge
from bridges.vision import VisionBridge, to_rgb
from qformer import QFormerConfig, Stage1Model
from qformer.cli import main
from qformer.hf_blip2 import MANIFEST, vision_tower_to_hf
from qformer.stage2 import Stage2Model

WIDTH = 32  # the tiny ViT's token width
CFG = QFormerConfig.from_name("tiny", vision_width=WIDTH, hidden_dropout=0.0, attention_dropout=0.0)
NO_LN_PRE = {"no_ln_pre": True}  # as the ShapesWorld ViT


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf_blip2")
    paths = {family: save_llm(family, tmp / family) for family in ("opt", "t5", "opt-untied")}
    paths["vit"] = save_open_clip_vit(tmp / "vit", "hf-blip2-test-vit", vision_options=NO_LN_PRE)
    paths["vit_ln_pre"] = save_open_clip_vit(tmp / "vit_ln_pre", "hf-blip2-test-vit-ln-pre")
    paths["tmp"] = tmp
    return paths


def stage2_checkpoint(
    saved, family: str, folder: Path, *, vit: str = "vit", prompt: str | None = "a photo of", **lora
) -> Path:
    """A stage-2 checkpoint with random trainable weights (so every one of them matters);
    `lora`: llm_lora / vision_lora settings."""
    name, weights = saved[vit]
    model = Stage2Model(CFG, vision=VisionBridge.from_open_clip(name, weights),
                        language=LanguageBridge.from_pretrained(saved[family]), prompt=prompt, **lora)  # fmt: skip
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.save_pretrained(folder)


def export(checkpoint: Path, out: Path) -> None:
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "hf-blip2", "--out", str(out)]) == 0


@pytest.fixture(scope="module")
def exported(saved):
    """family -> (stage-2 checkpoint, its hf-blip2 export)."""
    out = {}
    for family in ("opt", "t5", "opt-untied"):
        checkpoint = stage2_checkpoint(saved, family, saved["tmp"] / f"s2_{family}")
        target = saved["tmp"] / f"hf_{family}"
        export(checkpoint, target)
        out[family] = (checkpoint, target)
    return out


def images() -> list[Image.Image]:
    """Noise images, square and not: the processor must resize and crop as our transform does."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(32, 32), (40, 56), (64, 48)]]


def cut(rows: list[list[int]], end: int) -> list[list[int]]:
    return [row[: row.index(end)] if end in row else row for row in rows]


def with_token_ids(model: Stage2Model, run, monkeypatch) -> tuple[list[str], torch.Tensor]:
    """The texts `run()` returns, and the token ids our LLM generated for them."""
    captured = []
    original = model.language.model.generate

    def spy(*args, **kwargs):
        captured.append(original(*args, **kwargs))
        return captured[-1]

    with monkeypatch.context() as patch:
        patch.setattr(model.language.model, "generate", spy)
        texts = run()
    return texts, captured[0]


# ------------------------------------------------------------------------------ (a) parity
@pytest.mark.parametrize("family", ["opt", "t5", "opt-untied"])
def test_exported_model_decodes_our_greedy_tokens(exported, family, monkeypatch):
    checkpoint, target = exported[family]
    ours = Stage2Model.from_pretrained(checkpoint).eval()
    hf, info = Blip2ForConditionalGeneration.from_pretrained(target, output_loading_info=True)
    hf.eval()
    assert not any(info.values()), info  # no missing, unexpected or mismatched key
    head, embed = hf.language_model.get_output_embeddings().weight, hf.language_model.get_input_embeddings().weight
    assert (head.data_ptr() == embed.data_ptr()) == (family != "opt-untied")  # an untied OPT stays untied
    ours_head = ours.language.model.get_output_embeddings().weight
    assert_close(head[: len(ours_head)], ours_head)  # (an export may add a row for the <image> token)
    processor = Blip2Processor.from_pretrained(target, backend="pil")  # PIL: our transform, bit for bit
    manifest = json.loads((target / MANIFEST).read_text())
    assert manifest["prompt"] == ours.prompt == "a photo of"
    end = ours.language.end_token_id
    if family.startswith("opt"):  # the end of text is "\n", in the text config as in the released BLIP-2 OPT
        newline = ours.language.tokenizer("\n", add_special_tokens=False).input_ids[0]
        assert hf.config.text_config.eos_token_id == end == newline

    pictures = images()
    pixels = torch.stack([ours.vision.eval_transform()(to_rgb(image)) for image in pictures])
    # our caption prompt for every image; VQA prompts of different lengths (padding in the batch)
    questions = ["what is it?", "what colour is the big circle on the left?", "where?"]
    greedy = {"num_beams": 1, "max_new_tokens": 8}
    cases = [
        ([manifest["prompt"]] * 3, lambda: ours.generate(pixel_values=pixels, **greedy)),
        (
            [ours.vqa_template.format(q) for q in questions],
            lambda: ours.answer(questions, pixel_values=pixels, **greedy),
        ),
    ]
    config = copy.deepcopy(hf.generation_config)  # the exported decoding settings, made greedy
    config.update(**greedy)
    for prompts, run in cases:
        inputs = processor(images=pictures, text=prompts, padding=True, return_tensors="pt")
        assert torch.equal(inputs.pixel_values, pixels)
        placeholders = (inputs.input_ids == hf.config.image_token_index).sum(1)
        assert placeholders.tolist() == [CFG.num_query_tokens] * 3

        texts, ours_ids = with_token_ids(ours, run, monkeypatch)
        with torch.no_grad():
            out = hf.generate(**inputs, generation_config=config)
        # decoder-only: transformers returns the input ids first; encoder-decoder: the start token
        theirs = out[:, inputs.input_ids.shape[1] :] if family.startswith("opt") else out[:, 1:]
        ours_ids = ours_ids[:, 1:] if family == "t5" else ours_ids
        assert cut(theirs.tolist(), end) == cut(ours_ids.tolist(), end)  # token for token
        decoded = processor.batch_decode(cut(theirs.tolist(), end), skip_special_tokens=True)
        assert [text.strip() for text in decoded] == texts and any(texts)
        if family.startswith("opt"):  # transformers' own defaults stop at "\n" too: it comes with the text config
            with torch.no_grad():
                plain = hf.generate(**inputs, max_new_tokens=8, min_new_tokens=1)
            assert torch.equal(plain, out)

    # the image is not ignored: another image changes the logits
    inputs = processor(images=pictures, text=[manifest["prompt"]] * 3, return_tensors="pt")
    if family == "t5":
        inputs["decoder_input_ids"] = torch.full((3, 1), hf.config.text_config.decoder_start_token_id)
    with torch.no_grad():
        a = hf(**inputs).logits
        b = hf(**{**inputs, "pixel_values": torch.zeros_like(inputs.pixel_values)}).logits
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_exported_vision_model_gives_our_bridge_and_ln_vision_tokens(exported, family):
    checkpoint, target = exported[family]
    ours = Stage2Model.from_pretrained(checkpoint).eval()
    hf = Blip2ForConditionalGeneration.from_pretrained(target).eval()
    assert hf.config.vision_config.num_hidden_layers == 2  # 3 blocks, layer -2: the last stays behind
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours.ln_vision(ours.vision(pixels).float())  # (b, n, d_v)
        got = hf.vision_model(pixel_values=pixels).last_hidden_state  # what transformers feeds the Q-Former
        assert_close(got, expected, rtol=0, atol=1e-5)
        soft_prompt = hf.get_image_features(pixels).pooler_output  # (b, q, d_llm)
        assert_close(soft_prompt, ours.soft_prompt(pixel_values=pixels), rtol=1e-5, atol=1e-5)


def test_lora_adapters_are_merged_into_the_export(saved, tmp_path):
    lora = {"llm_lora": {"r": 4}, "vision_lora": {"r": 4}}  # B matrices made non-zero by the noise
    checkpoint = stage2_checkpoint(saved, "opt", tmp_path / "s2", **lora)
    export(checkpoint, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / MANIFEST).read_text())["lora_merged"] == ["llm", "vision"]
    ours = Stage2Model.from_pretrained(checkpoint).eval()
    hf = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = Blip2Processor.from_pretrained(tmp_path / "hf", backend="pil")
    inputs = processor(images=images(), text=[ours.prompt] * 3, return_tensors="pt")
    config = copy.deepcopy(hf.generation_config)
    config.update(num_beams=1, max_new_tokens=8)
    with torch.no_grad():
        assert_close(hf.get_image_features(inputs.pixel_values).pooler_output,
                     ours.soft_prompt(pixel_values=inputs.pixel_values), rtol=1e-5, atol=1e-5)  # fmt: skip
        out = hf.generate(**inputs, generation_config=config)[:, inputs.input_ids.shape[1] :]
    decoded = processor.batch_decode(cut(out.tolist(), ours.language.end_token_id), skip_special_tokens=True)
    expected = ours.generate(pixel_values=inputs.pixel_values, num_beams=1, max_new_tokens=8)
    assert [text.strip() for text in decoded] == expected and any(expected)


def test_default_processor_backend_is_within_one_level_of_our_transform(exported):
    checkpoint, target = exported["opt"]
    vision = Stage2Model.from_pretrained(checkpoint).vision
    processor = Blip2Processor.from_pretrained(target)  # torchvision backend: its own bicubic resize
    for image in images():
        pixels = processor(images=image, return_tensors="pt").pixel_values[0]
        expected = vision.eval_transform()(image)
        assert (pixels - expected).abs().max() <= 1 / 255 / min(vision.std) + 1e-5


@pytest.mark.parametrize("variant", ["plain", "quick_gelu", "layer_scale"])
def test_tower_variants_map_exactly(saved, variant):
    """The tower with random biases (open_clip starts them at zero), and open_clip options that
    Blip2VisionModel expresses: QuickGELU (its own hidden_act) and LayerScale (folded into the
    linear before it)."""
    from open_clip.transformer import LayerScale, QuickGELU

    name, weights = saved["vit"]
    bridge = VisionBridge.from_open_clip(name, weights)
    torch.manual_seed(2)
    with torch.no_grad():
        for key, p in bridge.tower.named_parameters():
            if key.endswith("bias"):
                p.normal_()
    for block in [] if variant == "plain" else bridge.tower.transformer.resblocks:
        if variant == "quick_gelu":
            block.mlp.gelu = QuickGELU()
        else:
            block.ls_1, block.ls_2 = LayerScale(WIDTH, 0.5), LayerScale(WIDTH, 0.5)
            with torch.no_grad():
                block.ls_1.gamma.normal_(), block.ls_2.gamma.normal_()
    config, state = vision_tower_to_hf(bridge, layer_norm_eps=1e-5)
    assert config.hidden_act == ("quick_gelu" if variant == "quick_gelu" else "gelu")
    tower = Blip2VisionModel(config).eval()
    ln = nn.LayerNorm(WIDTH)
    tower.load_state_dict({**state, **{f"post_layernorm.{k}": v for k, v in ln.state_dict().items()}})
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(tower(pixel_values=pixels).last_hidden_state, ln(bridge(pixels)), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ (b) round trips
def hf_source(family: str, folder: Path) -> Path:
    """A transformers BLIP-2 directory with random weights everywhere, k bias included."""
    from transformers import CLIPImageProcessor

    torch.manual_seed(3)
    llm, tokenizer = build_llm(family)
    processor = Blip2Processor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                               tokenizer, num_query_tokens=4)  # fmt: skip
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    if image_token >= llm.get_input_embeddings().num_embeddings:
        llm.resize_token_embeddings(image_token + 1)
    text_config = llm.config.to_dict()
    if family == "opt":  # as the released BLIP-2 OPT checkpoints: "\n" ends the text
        text_config["eos_token_id"] = tokenizer("\n", add_special_tokens=False).input_ids[0]
    vision = Blip2VisionConfig(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=32, patch_size=8, layer_norm_eps=1e-6)  # fmt: skip
    qformer = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 encoder_hidden_size=WIDTH, vocab_size=100, max_position_embeddings=40,
                                 use_qformer_text_input=False)  # fmt: skip
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text_config,
                         num_query_tokens=4, image_token_index=image_token)  # fmt: skip
    hf = Blip2ForConditionalGeneration(config)
    hf.language_model.load_state_dict(llm.state_dict())
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if not name.startswith("language_model."):
                p.normal_()
    hf.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_transformers_to_ours_to_transformers_keeps_every_tensor(saved, family, tmp_path):
    src = hf_source(family, tmp_path / "src")
    assert main(["import", "--from", "hf-blip2", str(src), "--out", str(tmp_path / "ours")]) == 0
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["kind"] == "qformer-stage2" and config["vision"]["source"] == "transformers"
    assert config["language"]["end_of_text"] == ("newline" if family == "opt" else "eos")
    export(tmp_path / "ours", tmp_path / "back")

    a = Blip2ForConditionalGeneration.from_pretrained(src).state_dict()
    b, info = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not any(info.values()), info
    b = b.state_dict()
    assert sorted(a) == sorted(b)
    assert a["vision_model.encoder.layers.0.self_attn.qkv.bias"][WIDTH : 2 * WIDTH].abs().sum() > 0  # k bias
    for key in a:
        assert torch.equal(a[key], b[key]), key
    src_config, back_config = Blip2Config.from_pretrained(src), Blip2Config.from_pretrained(tmp_path / "back")
    assert back_config.num_query_tokens == src_config.num_query_tokens
    assert back_config.image_token_index == src_config.image_token_index
    assert back_config.text_config.eos_token_id == src_config.text_config.eos_token_id
    for field in ("hidden_size", "num_hidden_layers", "image_size", "patch_size", "layer_norm_eps", "hidden_act"):
        assert getattr(back_config.vision_config, field) == getattr(src_config.vision_config, field), field


def test_ours_to_transformers_to_ours_captions_the_same(saved, exported, tmp_path):
    checkpoint, target = exported["opt"]
    assert main(["import", "--from", "hf-blip2", str(target), "--out", str(tmp_path / "again")]) == 0
    original = Stage2Model.from_pretrained(checkpoint).eval()
    again = Stage2Model.from_pretrained(tmp_path / "again").eval()
    assert again.prompt == original.prompt and again.language.end_of_text == original.language.end_of_text
    pixels = torch.stack([original.vision.eval_transform()(image) for image in images()])
    with torch.no_grad():
        assert_close(
            again.soft_prompt(pixel_values=pixels), original.soft_prompt(pixel_values=pixels), rtol=0, atol=1e-5
        )
    greedy = {"num_beams": 1, "max_new_tokens": 8}
    assert again.generate(pixel_values=pixels, **greedy) == original.generate(pixel_values=pixels, **greedy)


# ------------------------------------------------------------------------------ (c) what fails
def error_of(args: list[str], capsys) -> str:
    assert main(args) == 2
    return capsys.readouterr().err


def test_a_tower_with_ln_pre_is_refused_by_name_and_nothing_is_written(saved, tmp_path, capsys):
    checkpoint = stage2_checkpoint(saved, "opt", tmp_path / "s2", vit="vit_ln_pre")
    err = error_of(
        ["export", "--checkpoint", str(checkpoint), "--format", "hf-blip2", "--out", str(tmp_path / "x")], capsys
    )
    assert "ln_pre" in err and "no_ln_pre: true" in err
    assert not (tmp_path / "x").exists()


def test_every_problem_of_a_tower_is_named_at_once(saved):
    name, weights = saved["vit_ln_pre"]
    with pytest.raises(ValueError, match=r"(?s)ln_pre.*eps \[1e-05\] differs from ln_vision's 1e-06"):
        vision_tower_to_hf(VisionBridge.from_open_clip(name, weights), layer_norm_eps=1e-6)


def test_a_tower_of_another_kind_is_refused_by_name(tmp_path):
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)  # fmt: skip
    CLIPVisionModel(config).save_pretrained(tmp_path / "clip")
    bridge = VisionBridge.from_transformers(str(tmp_path / "clip"))
    with pytest.raises(ValueError, match="CLIPVisionModel.*pre_layrnorm"):
        vision_tower_to_hf(bridge, layer_norm_eps=1e-5)


def test_exporting_what_is_not_a_stage2_checkpoint_says_what_it_is(saved, tmp_path, capsys):
    Stage1Model(CFG).save_pretrained(tmp_path / "stage1")
    export = ["export", "--format", "hf-blip2", "--out", str(tmp_path / "x"), "--checkpoint"]
    err = error_of([*export, str(tmp_path / "stage1")], capsys)
    assert "'qformer-stage1' checkpoint" in err and "needs a stage-2 checkpoint" in err
    assert "transformers 'opt' model" in error_of([*export, saved["opt"]], capsys)
    assert "config.json not found" in error_of([*export, str(tmp_path)], capsys)

    # a stage-2 model trained on cached tokens, saved without naming its tower
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Stage2Model(CFG, language=LanguageBridge.from_pretrained(saved["opt"]))
    model.save_pretrained(tmp_path / "no_vision")
    assert "names no vision tower" in error_of([*export, str(tmp_path / "no_vision")], capsys)
    assert not (tmp_path / "x").exists()


def test_importing_what_is_not_transformers_blip2_says_what_it_is(saved, exported, tmp_path, capsys):
    run = ["import", "--from", "hf-blip2", "--out", str(tmp_path / "x")]
    torch.save({"query_tokens": torch.zeros(1, 4, 32)}, tmp_path / "blip2.pth")
    err = error_of([*run, str(tmp_path / "blip2.pth")], capsys)
    assert "is a file" in err and "--from lavis" in err
    assert "'opt' model" in error_of([*run, saved["opt"]], capsys)
    checkpoint, _ = exported["opt"]
    assert "already one of our checkpoints ('qformer-stage2')" in error_of([*run, str(checkpoint)], capsys)
    assert "config.json not found" in error_of([*run, str(tmp_path)], capsys)
    Blip2Config(architectures=["Blip2Model"]).save_pretrained(tmp_path / "blip2_model")
    err = error_of([*run, str(tmp_path / "blip2_model")], capsys)
    assert "Blip2Model" in err and "Blip2ForConditionalGeneration" in err
    assert not (tmp_path / "x").exists()
