"""`qformer eval`: retrieval (stage-1 checkpoints), captioning and VQA (stage-2 checkpoints).

The evaluation data is a JSON list (or JSONL) of records, one per image: `image` (a path, relative
to the file's folder), `caption` (a string or a list of reference captions), and optionally
`scene_key` (records with equal keys show the same scene, so either one's caption is a hit),
`scene` (ShapesWorld: lets captions be checked attribute by attribute) and `qa` (a list of
{"question", "answer"}).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qformer.checkpoint import CheckpointError, read_model_dir


def read_records(path: str | Path) -> tuple[list[dict[str, Any]], Path]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Evaluation data {path} not found.")
    text = path.read_text()
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(records, dict):
        records = records.get("annotations") or records.get("data") or []
    if not records:
        raise ValueError(f"{path} holds no records: expected a JSON list of {{image, caption}} records.")
    for i, r in enumerate(records):
        if "image" not in r:
            raise ValueError(f"{path}, record {i}: no `image` key (keys: {sorted(r)}).")
    return records, path.parent


def references(record: dict[str, Any]) -> list[str]:
    caption = record.get("caption", [])
    return [caption] if isinstance(caption, str) else list(caption)


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def image_pixels(bridge, paths: list[Path]) -> Tensor:
    from bridges.vision import load_image

    transform = bridge.eval_transform()
    return torch.stack([transform(load_image(p)) for p in paths])


def checkpoint_kind(directory: str | Path) -> str:
    return read_model_dir(directory)[0].get("kind", "unknown")


# ------------------------------------------------------------------------------ retrieval
def load_stage1(directory: str | Path, device: str | torch.device = "cpu"):
    """(Stage1Model, tokenizer, vision bridge) from a stage-1 checkpoint directory."""
    from transformers import AutoTokenizer

    from bridges.vision import VisionBridge
    from qformer.stage1 import Stage1Model

    config, _ = read_model_dir(directory)
    if config.get("kind") != Stage1Model.KIND:
        raise CheckpointError(
            f"{directory} is a {config.get('kind')!r} checkpoint; retrieval needs a stage-1 checkpoint (ITC/ITM heads)."
        )
    if not config.get("vision"):
        raise CheckpointError(f"{directory}/config.json names no vision tower (`vision`).")
    model = Stage1Model.from_pretrained(directory).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(Path(directory) / "tokenizer")
    return model, tokenizer, VisionBridge.from_spec(config["vision"], device=device)


@torch.no_grad()
def evaluate_retrieval(
    checkpoint: str | Path, data: str | Path, *, k_test: int = 128, batch_size: int = 64, max_text_len: int = 35,
    fusion: str = "logit",
) -> dict[str, Any]:
    """Recall@1/5/10 both ways, by ITC alone and after ITM re-ranking of the top k, of a stage-1
    or BLIP checkpoint (`fusion`: what ITM's logit is added to, `retrieval_scores`). Where records
    carry `scene_key`, a hit is any text of the same scene; strict instance-level recall beside it."""
    from qformer.eval.retrieval import recall_at_k, retrieval_scores

    if checkpoint_kind(checkpoint) == "blip":  # BLIP: its own trained ViT and final norm
        from qformer.blip import BlipModel

        model = BlipModel.from_pretrained(checkpoint, need=("retrieval", "itm")).eval()
        tokenizer, bridge, embed = model.tokenizer, model.vision, model.embed_image
    else:
        model, tokenizer, bridge = load_stage1(checkpoint)
        embed = bridge
    records, root = read_records(data)
    tokens = torch.cat([embed(image_pixels(bridge, [root / r["image"] for r in chunk])) for chunk in _batches(records, batch_size)])
    texts, owner = [], []
    for i, r in enumerate(records):
        for caption in references(r):
            texts.append(caption)
            owner.append(i)
    text = tokenizer(texts, padding="longest", truncation=True, max_length=max_text_len, return_tensors="pt")
    scores = retrieval_scores(
        model, tokens, text.input_ids, text.attention_mask, k_test=k_test, batch_size=batch_size, fusion=fusion
    )
    instance = [[j for j, o in enumerate(owner) if o == i] for i in range(len(records))]
    result: dict[str, Any] = {"num_images": len(records), "num_texts": len(texts), "k_test": k_test, "fusion": fusion}
    if all("scene_key" in r for r in records):
        keys = [r["scene_key"] for r in records]
        hits = torch.tensor([[keys[i] == keys[owner[j]] for j in range(len(texts))] for i in range(len(records))])
        result["itc"] = recall_at_k(scores["itc"], text_hits=hits)
        result["itm"] = recall_at_k(scores["itm_i2t"], text_hits=hits, scores_t2i=scores["itm_t2i"])
        result["hit"] = "same scene"
    result["instance"] = {
        "itc": recall_at_k(scores["itc"], instance),
        "itm": recall_at_k(scores["itm_i2t"], instance, scores_t2i=scores["itm_t2i"]),
    }
    if "itc" not in result:
        result["itc"], result["itm"], result["hit"] = result["instance"]["itc"], result["instance"]["itm"], "instance"
    return result


# ------------------------------------------------------------------------------ captions and VQA
def load_stage2(directory: str | Path, device: str | torch.device = "cpu"):
    from qformer.stage2 import Stage2Model

    kind = checkpoint_kind(directory)
    if kind != Stage2Model.KIND:
        raise CheckpointError(
            f"{directory} is a {kind!r} checkpoint; captioning and VQA need a stage-2 checkpoint (with an LLM)."
        )
    return Stage2Model.from_pretrained(directory, device=device).eval()


@torch.no_grad()
def generate_captions(model, records, root: Path, *, batch_size: int = 32, **generation) -> list[str]:
    out: list[str] = []
    for chunk in _batches(records, batch_size):
        pixels = image_pixels(model.vision, [root / r["image"] for r in chunk])
        out += model.generate(pixel_values=pixels, **generation)
    return out


def caption_exact_match(captions: list[str], records: list[dict[str, Any]]) -> dict[str, Any]:
    """`exact_match`: the share of `captions` that state their ShapesWorld record's scene exactly
    (`shapes.all_correct`: every object with every attribute, no object too many or too few,
    every relation true); `exact_match_by_objects`: the same for the scenes of each object count
    ({"1": ..., "2": ..., "3": ...}, only the counts present)."""
    from qformer.world.shapes import Scene, all_correct

    if len(captions) != len(records) or not records:
        raise ValueError(f"need one caption per record, got {len(captions)} captions for {len(records)} records")
    by_objects: dict[str, list[bool]] = {}
    for c, r in zip(captions, records):
        by_objects.setdefault(str(len(r["scene"])), []).append(all_correct(c, Scene.from_json(r["scene"])))
    right = [x for v in by_objects.values() for x in v]
    return {
        "exact_match": sum(right) / len(right),
        "exact_match_by_objects": {k: sum(v) / len(v) for k, v in sorted(by_objects.items())},
    }


def evaluate_captions(
    checkpoint: str | Path, data: str | Path, *, num_beams: int = 5, max_new_tokens: int = 30, batch_size: int = 32
) -> dict[str, Any]:
    """BLEU-4 and CIDEr (COCO protocol) against each record's references, of a stage-2 or BLIP
    checkpoint's captions; `exact_match`: the share of captions with every attribute right
    (ShapesWorld records, which carry `scene`)."""
    from qformer.eval.metrics import caption_scores

    if checkpoint_kind(checkpoint) == "blip":
        from qformer.blip import BlipModel

        model = BlipModel.from_pretrained(checkpoint, need="caption").eval()
    else:
        model = load_stage2(checkpoint)
    records, root = read_records(data)
    captions = generate_captions(model, records, root, batch_size=batch_size, num_beams=num_beams, max_new_tokens=max_new_tokens)
    scores = caption_scores({i: c for i, c in enumerate(captions)}, {i: references(r) for i, r in enumerate(records)})
    result: dict[str, Any] = {"bleu4": scores["bleu_4"], "cider": scores["cider"], "num_images": len(records)}
    if all("scene" in r for r in records):
        result |= caption_exact_match(captions, records)
    result["samples"] = [{"image": r["image"], "caption": c} for r, c in list(zip(records, captions))[:50]]
    return result


def evaluate_vqa(checkpoint: str | Path, data: str | Path, *, batch_size: int = 32, num_beams: int = 5) -> dict[str, Any]:
    """VQAv2 accuracy of the model's answers to the records' `qa` questions, each asked in the
    checkpoint's `vqa_template` (BLIP-2's default "Question: {} Short answer:"); per question type
    too when the pairs carry a `type`."""
    from qformer.eval.metrics import vqa_accuracy

    model = load_stage2(checkpoint)
    records, root = read_records(data)
    items = [(r, qa) for r in records for qa in r.get("qa", [])]
    if not items:
        raise ValueError(f"{data} has no `qa` lists: VQA needs question-answer pairs.")
    answers: list[str] = []
    with torch.no_grad():
        for chunk in _batches(items, batch_size):
            pixels = image_pixels(model.vision, [root / r["image"] for r, _ in chunk])
            answers += model.answer([qa["question"] for _, qa in chunk], pixel_values=pixels, num_beams=num_beams)
    scores = [vqa_accuracy(a, [qa["answer"]]) for a, (_, qa) in zip(answers, items)]
    by_type: dict[str, list[float]] = {}
    for score, (_, qa) in zip(scores, items):
        by_type.setdefault(qa.get("type", "all"), []).append(score)
    return {
        "accuracy": sum(scores) / len(scores),
        "by_type": {t: sum(v) / len(v) for t, v in sorted(by_type.items())},
        "num_questions": len(items),
        "samples": [{"image": r["image"], "question": qa["question"], "answer": a, "truth": qa["answer"]}
                    for a, (r, qa) in list(zip(answers, items))[:50]],  # fmt: skip
    }
