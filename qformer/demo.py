"""`qformer demo`: BLIP-2 end to end on ShapesWorld, on a CPU, in minutes.

From nothing to a trained two-stage model with the same code paths a real EVA ViT-g and OPT-2.7B
take: build the world, train (or load from the cache) its tiny frozen backbones, cache the tower's
tokens, run the stage-1 and stage-2 recipes, evaluate retrieval, captioning and VQA on held-out
images (and on a compositional split: attribute pairs never seen in training), run the BLIP-2
ablation (stage 2 without stage 1), and write `metrics.json` and `report.html`.

    qformer demo --out runs/demo [--llm opt|t5] [--world simple|full] [--minutes N]
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch


# The world's LMs were pre-trained on "scene : <words> . caption : ..." and "... question : ...
# answer : ...": the soft visual prompt takes the place of the scene words.
CAPTION_PROMPT = ". caption :"
VQA_TEMPLATE = ". question : {} answer :"


@dataclass
class DemoPlan:
    """How much of everything: the only knobs the demo has. `scale` stretches every training
    budget (`--minutes` sets it from the time left after the backbones)."""

    n_train: int = 5000
    n_test: int = 500
    n_compositional: int = 200
    stage1_steps: int = 450
    stage2_steps: int = 700
    batch_size: int = 64
    num_queries: int = 8
    k_test: int = 16  # retrieval: candidates re-ranked by ITM
    qa_per_image: int = 2  # stage 2 also learns to answer: this many question-answer records per image
    num_beams: int = 5
    vision_layer: int = -2  # the tower block the Q-Former reads

    def scaled(self, factor: float) -> DemoPlan:
        return DemoPlan(**{**self.__dict__, "stage1_steps": max(10, int(self.stage1_steps * factor)),
                           "stage2_steps": max(10, int(self.stage2_steps * factor))})  # fmt: skip


FAST = DemoPlan(n_train=128, n_test=16, n_compositional=8, stage1_steps=4, stage2_steps=4, batch_size=16, k_test=4, num_beams=1)


class Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def phase(self, name: str):
        clock = self

        class _Phase:
            def __enter__(self):
                print(f"\n== {name}", flush=True)
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                clock.seconds[name] = round(time.perf_counter() - self.start, 1)
                print(f"== {name}: {clock.seconds[name]:.1f} s", flush=True)
                return False

        return _Phase()


def world_tokenizer_for_qformer(data_dir: Path, out_dir: Path) -> Path:
    """A BERT-style word-level tokenizer over the world's words ([CLS] ... [SEP], uncased), so the
    Q-Former's embedding and LM head are as small as the world. A real run uses bert-base-uncased."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words: set[str] = set()
    for text in (CAPTION_PROMPT, VQA_TEMPLATE.format("")):  # what an instruction-aware Q-Former reads
        words.update(pre_tokenizers.BertPreTokenizer().pre_tokenize_str(text.lower()))
    for split in ("train", "test", "compositional_test"):
        path = data_dir / f"{split}.json"
        if not path.is_file():
            continue
        for record in json.loads(path.read_text()):
            captions = record["caption"] if isinstance(record["caption"], list) else [record["caption"]]
            for text in captions + [qa["question"] for qa in record.get("qa", [])]:
                words.update(pre_tokenizers.BertPreTokenizer().pre_tokenize_str(text.lower()))
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    punctuation = set(",.?!-:;'\"()")
    vocab = {w: i for i, w in enumerate(specials + sorted({w for w, _ in words} | punctuation))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    ).save_pretrained(out_dir)
    return out_dir


def write_caption_and_vqa_mixture(train: Path, out: Path, qa_per_image: int, *, seed: int) -> Path:
    """Stage 2's training file: every caption record of `train`, plus `qa_per_image` of each
    image's question-answer pairs as {"image", "image_id", "question", "answer"} records (drawn
    at random for a seed), so that stage 2 learns to caption and to answer, as BLIP-2's VQA
    fine-tuning does; with 0 it is the captions alone and VQA is zero-shot."""
    import random

    records = json.loads(train.read_text())
    rng = random.Random(f"{seed}/qa-mixture")
    questions = [
        {"image": r["image"], "image_id": r["image_id"], "question": qa["question"], "answer": qa["answer"]}
        for r in records for qa in rng.sample(r.get("qa", []), min(qa_per_image, len(r.get("qa", []))))
    ]  # fmt: skip
    out.write_text(json.dumps(records + questions) + "\n")
    return out


def run_demo(
    out: str | Path,
    *,
    llm: Literal["opt", "t5"] = "opt",
    world: Literal["simple", "full"] = "simple",
    recipe: Literal["blip2", "blip", "capfilt"] = "blip2",
    minutes: float | None = None,
    seed: int = 0,
    plan: DemoPlan | None = None,
    cache_dir: str | Path | None = None,
    fast: bool = False,
) -> dict[str, Any]:
    if recipe in ("blip", "capfilt"):  # the BLIP baseline and its CapFilt bootstrapping: qformer/demo_blip.py
        from qformer import demo_blip

        run = demo_blip.run_blip_demo if recipe == "blip" else demo_blip.run_capfilt_demo
        return run(out, world=world, minutes=minutes, seed=seed, cache_dir=cache_dir, fast=fast)
    from qformer.world.backbones import ensure_backbones
    from qformer.world.shapes import generate_world
    from recipes.stage1 import Stage1Recipe, Stage1Settings
    from recipes.stage2 import Stage2Recipe, Stage2Settings

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # the full world (1 to 3 objects, relations) has far more scenes: twice the training images
    plan = plan or (FAST if fast else DemoPlan(n_train=10000) if world == "full" else DemoPlan())
    clock = Clock()
    started = time.perf_counter()
    torch.manual_seed(seed)

    # step 1: the world: train / test / compositional_test splits written as JSON + PNG
    with clock.phase("data"):
        data = out / "data"
        if not (data / "world.json").is_file():
            generate_world(data, level=world, n_train=plan.n_train, n_test=plan.n_test,
                           n_compositional=plan.n_compositional, image_size=64, seed=seed)  # fmt: skip
        tokenizer_dir = world_tokenizer_for_qformer(data, out / "qformer_tokenizer")
        stage2_data = write_caption_and_vqa_mixture(data / "train.json", data / "train_stage2.json",
                                                    plan.qa_per_image, seed=seed)  # fmt: skip

    # step 2: the frozen backbones, trained on the world once and cached
    with clock.phase("backbones"):
        backbones = ensure_backbones(world, cache_dir=cache_dir, seed=seed, llm=llm, fast=fast, num_queries=plan.num_queries)
    if minutes is not None and not fast:
        left = minutes * 60 - (time.perf_counter() - started)
        plan = plan.scaled(max(0.1, left / _default_training_seconds()))
    # the tower's config file as its name: checkpoints then load it in any process
    vision = {"source": "open_clip", "name": backbones["vit_config"], "pretrained": backbones["vit_weights"], "layer": plan.vision_layer}

    # step 3: run the tower once over the training images (eval transform, fp16 on disk)
    with clock.phase("feature cache"):
        from bridges.vision import VisionBridge
        from qformer.data import load_pairs
        from qformer.feature_cache import write_feature_cache

        bridge = VisionBridge.from_spec(vision)
        write_feature_cache(bridge, load_pairs(data / "train.json"), out / "features", batch_size=256)

    common = dict(
        train_data=str(data / "train.json"), feature_cache=str(out / "features"), batch_size=plan.batch_size,
        mixed_precision="no", log_every=max(1, min(25, plan.stage1_steps // 4)), seed=seed, weight_decay=0.05,
    )  # fmt: skip
    qformer = dict(num_query_tokens=plan.num_queries, hidden_size=128, num_heads=4, intermediate_size=256,
                   num_layers=4, cross_attention_freq=1, embed_dim=64, max_position_embeddings=64,
                   hidden_dropout=0.0, attention_dropout=0.0)  # fmt: skip

    # step 4: stage 1 (ITC + ITM + ITG) on the cached tokens
    with clock.phase("stage 1"):
        s1 = Stage1Settings(
            output_dir=str(out / "stage1"), vision=vision, bert=None, tokenizer=str(tokenizer_dir),
            qformer_preset="tiny", qformer=qformer, max_steps=plan.stage1_steps, save_every=plan.stage1_steps,
            lr=1e-3, min_lr=1e-4, warmup_lr=1e-5, warmup_steps=max(1, plan.stage1_steps // 20), **common,
        )  # fmt: skip
        _run(Stage1Recipe(s1))

    # step 5: stage 2 from the stage-1 Q-Former, and the ablation from a fresh one, same budget
    def stage2(name: str, stage1: str | None) -> Path:
        s2 = Stage2Settings(
            output_dir=str(out / name), llm=backbones["llm_dir"], stage1=stage1, vision=vision,
            **{**common, "train_data": str(stage2_data)},
            tokenizer=str(tokenizer_dir), qformer_preset="tiny", qformer=qformer if stage1 is None else {},
            max_steps=plan.stage2_steps, save_every=plan.stage2_steps, lr=2e-3, min_lr=1e-4, warmup_lr=1e-5,
            warmup_steps=max(1, plan.stage2_steps // 20), prompt=CAPTION_PROMPT, vqa_template=VQA_TEMPLATE,
        )  # fmt: skip
        _run(Stage2Recipe(s2))
        return out / name / "model"

    with clock.phase("stage 2"):
        stage2_model = stage2("stage2", str(out / "stage1" / "model"))
    with clock.phase("ablation: stage 2 without stage 1"):
        ablation_model = stage2("stage2_without_stage1", None)

    # step 6: evaluation on held-out images, and on the compositional split
    from qformer import evaluate

    metrics: dict[str, Any] = {"world": world, "llm": llm, "plan": plan.__dict__}
    with clock.phase("evaluation"):
        test = data / "test.json"
        retrieval = evaluate.evaluate_retrieval(out / "stage1" / "model", test, k_test=plan.k_test)
        caption = evaluate.evaluate_captions(stage2_model, test, num_beams=plan.num_beams)
        vqa = evaluate.evaluate_vqa(stage2_model, test, num_beams=plan.num_beams)
        ablation = evaluate.evaluate_captions(ablation_model, test, num_beams=plan.num_beams)
        metrics["retrieval"] = {k: retrieval[k] for k in ("itc", "itm", "instance", "hit")}
        metrics["caption"] = {k: caption[k] for k in ("bleu4", "cider", "exact_match")}
        metrics["vqa"] = {k: vqa[k] for k in ("accuracy", "by_type")}
        metrics["ablation"] = {"without_stage1": {"caption": {k: ablation[k] for k in ("bleu4", "cider", "exact_match")}}}
        comp = data / "compositional_test.json"
        if comp.is_file() and json.loads(comp.read_text()):
            c_ret = evaluate.evaluate_retrieval(out / "stage1" / "model", comp, k_test=plan.k_test)
            c_cap = evaluate.evaluate_captions(stage2_model, comp, num_beams=plan.num_beams)
            c_vqa = evaluate.evaluate_vqa(stage2_model, comp, num_beams=plan.num_beams)
            metrics["compositional"] = {
                "retrieval": {k: c_ret[k] for k in ("itc", "itm")},
                "caption": {k: c_cap[k] for k in ("bleu4", "cider", "exact_match")},
                "vqa": {"accuracy": c_vqa["accuracy"]},
            }
    metrics["seconds"] = {**clock.seconds, "total": round(time.perf_counter() - started, 1)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    with clock.phase("report"):
        _write_report(out, metrics, caption, vqa, stage2_model, data, plan)
    metrics["seconds"] = {**clock.seconds, "total": round(time.perf_counter() - started, 1)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print_table(metrics)
    return metrics


def _default_training_seconds() -> float:
    # stage 1 + stage 2 + ablation + evaluation of the default plan, measured on the 2-core CPU
    # (simple world: 180 + 105 + 101 + 50 s); `--minutes` scales the steps by the time left over this
    return 440.0


def _run(recipe) -> None:
    recipe.setup()
    recipe.train()
    recipe.cleanup()


def _write_report(out: Path, metrics, caption, vqa, stage2_model: Path, data: Path, plan: DemoPlan) -> None:
    from qformer import evaluate
    from qformer.report import attention_maps, render_report
    from qformer.world.shapes import Scene, all_correct
    from recipes.common import read_metrics

    records, root = evaluate.read_records(data / "test.json")
    by_image = {r["image"]: r for r in records}
    captions = [
        {"image": str(root / s["image"]), "caption": s["caption"], "references": evaluate.references(by_image[s["image"]]),
         "correct": all_correct(s["caption"], Scene.from_json(by_image[s["image"]]["scene"]))}
        for s in caption["samples"][:24]
    ]  # fmt: skip
    answers = [{**s, "image": str(root / s["image"])} for s in vqa["samples"][:24]]
    retrieval = _retrieval_examples(out / "stage1" / "model", records[:200], root)
    model = evaluate.load_stage2(stage2_model)
    pixels = evaluate.image_pixels(model.vision, [root / r["image"] for r in records[:4]])
    with torch.no_grad():
        tokens = model.ln_vision(model.vision(pixels).float())
    side = int(round((tokens.shape[1] - 1) ** 0.5))
    maps = attention_maps(model.qformer, tokens, grid=(side, side))
    attention = [{"image": str(root / r["image"]), "maps": m} for r, m in zip(records[:4], maps)]
    curves = {name: read_metrics(out / name / "metrics.jsonl") for name in ("stage1", "stage2")}
    render_report(out, metrics=metrics, captions=captions, vqa=answers, retrieval=retrieval, curves=curves,
                  attention=attention, title="qformer demo: BLIP-2 on ShapesWorld")  # fmt: skip


def _retrieval_examples(checkpoint: Path, records: list[dict], root: Path, n: int = 6) -> list[dict]:
    """For a few captions, the five images the stage-1 model ranks first by ITC."""
    from qformer import evaluate

    model, tokenizer, bridge = evaluate.load_stage1(checkpoint)
    with torch.no_grad():
        tokens = bridge(evaluate.image_pixels(bridge, [root / r["image"] for r in records]))
        _, image_feats = model.encode_image(tokens)
        queries = [evaluate.references(r)[0] for r in records[:n]]
        text = tokenizer(queries, padding="longest", return_tensors="pt")
        _, text_feats = model.encode_text(text.input_ids, text.attention_mask)
        scores = model.itc_scores(image_feats, text_feats).T  # (queries, images)
    examples = []
    for q, (query, row) in enumerate(zip(queries, scores)):
        top = row.topk(5).indices.tolist()
        examples.append({
            "query": query,
            "images": [str(root / records[i]["image"]) for i in top],
            "hits": [records[i].get("scene_key") == records[q].get("scene_key") for i in top],
        })  # fmt: skip
    return examples


def print_table(metrics: dict[str, Any]) -> None:
    r = metrics["retrieval"]
    rows = [
        ("retrieval R@1 i2t / t2i (ITC)", f"{r['itc']['i2t_r1']:.3f} / {r['itc']['t2i_r1']:.3f}"),
        ("retrieval R@1 i2t / t2i (ITM re-ranked)", f"{r['itm']['i2t_r1']:.3f} / {r['itm']['t2i_r1']:.3f}"),
        ("captions with every attribute right", f"{metrics['caption']['exact_match']:.3f}"),
        ("caption BLEU-4 / CIDEr", f"{metrics['caption']['bleu4']:.3f} / {metrics['caption']['cider']:.3f}"),
        (f"VQA accuracy ({'trained on QA pairs' if metrics['plan'].get('qa_per_image') else 'zero-shot'})",
         f"{metrics['vqa']['accuracy']:.3f}"),
        ("ablation: CIDEr without stage 1", f"{metrics['ablation']['without_stage1']['caption']['cider']:.3f}"),
    ]
    if "compositional" in metrics:
        c = metrics["compositional"]
        rows += [
            ("compositional: attributes right", f"{c['caption']['exact_match']:.3f}"),
            ("compositional: VQA accuracy", f"{c['vqa']['accuracy']:.3f}"),
        ]
    rows.append(("seconds", ", ".join(f"{k} {v:.0f}" for k, v in metrics["seconds"].items())))
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows))
