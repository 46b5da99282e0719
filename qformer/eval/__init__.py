"""Evaluation: caption metrics (BLEU, CIDEr-D), VQAv2 accuracy, retrieval recall@k and the
stage-1 retrieval / zero-shot scores they are computed from."""

from qformer.eval.metrics import (
    bleu,
    caption_scores,
    cider,
    coco_tokenize,
    normalize_answer,
    vqa_accuracy,
    vqa_score,
)
from qformer.eval.retrieval import (
    recall_at_k,
    retrieval_scores,
    zero_shot_classification,
)

__all__ = [
    "bleu",
    "caption_scores",
    "cider",
    "coco_tokenize",
    "normalize_answer",
    "recall_at_k",
    "retrieval_scores",
    "vqa_accuracy",
    "vqa_score",
    "zero_shot_classification",
]
