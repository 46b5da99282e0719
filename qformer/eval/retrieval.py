"""Image-text retrieval with a stage-1 model, recall@k, and zero-shot classification by ITC.

Retrieval follows BLIP-2 (and LAVIS): ITC similarity for every pair, then for each image its top
`k_test` texts by ITC, and for each text its top `k_test` images, are re-scored with ITM; the final
score of a candidate pair is the ITM "match" logit (averaged over the queries) plus its ITC score,
and pairs that were not candidates score -inf. The ITC score added is, by default, ITC's logit:
the cosine similarity divided by the model's learned temperature, the quantity ITC's softmax was
trained on, so that both terms are logits (`fusion="logit"`). LAVIS adds the bare cosine
(`fusion="lavis"`, to compare with published BLIP/BLIP-2 numbers); with a learned temperature
near 0.03 that weighs ITC about thirty times less than training did, and ITM's logit, whose
spread is several units, decides alone among candidates whose cosines differ by hundredths.

Legend: I images, T texts, C classes, n image tokens, d_v vision width, t text tokens, q queries,
e ITC embedding width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from qformer.stage1 import Stage1Model

# ---------------------------------------------------------------------------------------------
# Recall@k
# ---------------------------------------------------------------------------------------------


def _hit_matrix(
    shape: tuple[int, int], image_to_texts: Sequence[Sequence[int]] | None, text_hits: Tensor | None
) -> Tensor:
    """(I, T) bool: which (image, text) pairs count as a hit, checked to give every image and
    every text at least one."""
    num_images, num_texts = shape
    if text_hits is not None:
        if text_hits.shape != shape or text_hits.dtype != torch.bool:
            raise ValueError(
                f"`text_hits` must be a bool tensor shaped like the scores {shape}, got "
                f"{text_hits.dtype} {tuple(text_hits.shape)}."
            )
        hits = text_hits
    elif image_to_texts is not None:
        if len(image_to_texts) != num_images:
            raise ValueError(
                f"`image_to_texts` has {len(image_to_texts)} entries for {num_images} images (score "
                f"rows); give one list of positive text indices per image."
            )
        hits = torch.zeros(shape, dtype=torch.bool)
        for i, texts in enumerate(image_to_texts):
            for t in texts:
                if not 0 <= t < num_texts:
                    raise ValueError(
                        f"`image_to_texts[{i}]` names text {t}, but there are {num_texts} texts."
                    )
                hits[i, t] = True
    else:
        raise ValueError(
            "Give the positives: `image_to_texts` (instance mapping) or `text_hits` (hit matrix)."
        )
    problems = []
    for dim, what, other in ((1, "image", "text"), (0, "text", "image")):
        lonely = (~hits.any(dim=dim)).nonzero().flatten().tolist()
        if lonely:
            problems.append(f"{len(lonely)} {what}(s) have no positive {other}, e.g. {what}s {lonely[:5]}")
    if problems:
        raise ValueError("Recall is undefined:\n  - " + "\n  - ".join(problems))
    return hits


def _recalls(scores: Tensor, hits: Tensor, ks: Sequence[int]) -> list[float]:
    """Fraction of rows whose best positive ranks within the top k, for each k."""
    best = scores.masked_fill(~hits, float("-inf")).amax(dim=1, keepdim=True)  # (rows, 1)
    # Ties count against the positive: a negative scoring the same ranks ahead of it, so a model
    # that scores everything equal gets no hits, and a positive at -inf (never a candidate) is
    # found only if fewer than k negatives exist.
    rank = ((scores >= best) & ~hits).sum(dim=1)  # (rows,) negatives ahead of the best positive
    return [(rank < k).float().mean().item() for k in ks]


def recall_at_k(
    scores: Tensor,
    image_to_texts: Sequence[Sequence[int]] | None = None,
    *,
    text_hits: Tensor | None = None,
    scores_t2i: Tensor | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k in both directions from an (I, T) score matrix, as fractions in [0, 1].

    scores: (I, T), higher is better; used for image->text, and for text->image too unless
        `scores_t2i` (I, T) is given (the two ITM-rescored matrices of `retrieval_scores`).
    image_to_texts: the positive texts of each image (COCO/Flickr: its 5 captions); a text's
        positive images are the images that list it.
    text_hits: (I, T) bool, which pairs count as hits; replaces `image_to_texts` when given (for
        ShapesWorld, where one caption can fit several images of the same scene).

    Image->text at k: the share of images with a positive text among their top k texts; text->image
    likewise. Returns {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", ..., "r_mean"}, where r_mean, the
    mean of all of them, is what LAVIS selects checkpoints by.
    """
    if scores.dim() != 2:
        raise ValueError(f"`scores` must be (images, texts), got shape {tuple(scores.shape)}")
    if scores_t2i is not None and scores_t2i.shape != scores.shape:
        raise ValueError(f"`scores_t2i` {tuple(scores_t2i.shape)} must match `scores` {tuple(scores.shape)}")
    hits = _hit_matrix(tuple(scores.shape), image_to_texts, text_hits).to(scores.device)
    t2i = scores if scores_t2i is None else scores_t2i
    out = {}
    for name, s, h in (("i2t", scores, hits), ("t2i", t2i.t(), hits.t())):
        for k, r in zip(ks, _recalls(s.float(), h, ks)):
            out[f"{name}_r{k}"] = r
    out["r_mean"] = sum(out.values()) / len(out)
    return out


# ---------------------------------------------------------------------------------------------
# Scores from a stage-1 model
# ---------------------------------------------------------------------------------------------


def _device(model: Stage1Model) -> torch.device:
    return next(model.parameters()).device


def _image_feats(model: Stage1Model, image_embeds: Tensor, batch_size: int) -> Tensor:
    """Normalised ITC features (I, q, e) of every image, on the model's device."""
    device = _device(model)
    chunks = [model.encode_image(x.to(device))[1] for x in image_embeds.split(batch_size)]
    return torch.cat(chunks)


def _text_feats(model: Stage1Model, input_ids: Tensor, text_mask: Tensor, batch_size: int) -> Tensor:
    """Normalised ITC features (T, e) of every text, on the model's device."""
    device = _device(model)
    chunks = [
        model.text_features(ids.to(device), mask.to(device))
        for ids, mask in zip(input_ids.split(batch_size), text_mask.split(batch_size))
    ]
    return torch.cat(chunks)


def _itc_matrix(model: Stage1Model, image_feats: Tensor, text_feats: Tensor, batch_size: int) -> Tensor:
    # By image chunks: `itc_scores` holds an (I, T, q) tensor before its max over queries, too big
    # for a whole test set at once (5k x 25k x 32 floats for COCO).
    rows = [model.itc_scores(f, text_feats).float().cpu() for f in image_feats.split(batch_size)]
    return torch.cat(rows)  # (I, T)


def _check_inputs(image_embeds: Tensor, input_ids: Tensor, text_mask: Tensor, batch_size: int) -> None:
    problems = []
    if image_embeds.dim() != 3:
        problems.append(
            f"`image_embeds` must be (images, tokens, d_v), got shape {tuple(image_embeds.shape)}"
        )
    if input_ids.dim() != 2 or input_ids.shape != text_mask.shape:
        problems.append(
            f"`input_ids` and `text_mask` must both be (texts, tokens), got {tuple(input_ids.shape)} "
            f"and {tuple(text_mask.shape)}"
        )
    if batch_size < 1:
        problems.append(f"`batch_size` must be at least 1, got {batch_size}")
    if problems:
        raise ValueError("Bad retrieval inputs:\n  - " + "\n  - ".join(problems))


@torch.no_grad()
def retrieval_scores(
    model: Stage1Model,
    image_embeds: Tensor,
    input_ids: Tensor,
    text_mask: Tensor,
    *,
    k_test: int = 128,
    batch_size: int = 64,
    progress: bool | None = None,
    fusion: Literal["logit", "lavis"] = "logit",
) -> dict[str, Tensor]:
    """ITC and ITM-rescored score matrices of every image against every text.

    image_embeds: (I, n, d_v) frozen vision tokens (may stay on the CPU: chunks move to the model's
        device); input_ids / text_mask: (T, t) tokenized texts starting with [CLS].
    k_test: candidates re-scored with ITM per image and per text (BLIP-2 uses 128 on COCO and
        Flickr30K); k_test >= T (and >= I) re-scores every pair.
    batch_size: images or texts per feature pass, and pairs per ITM pass.
    progress: show a progress bar over the ITM passes; by default when there are more than 20 of them.
    fusion: what a candidate's ITM match logit is added to: "logit", its ITC cosine / the model's
        temperature `model.temp` (ITC's logit); "lavis", the bare cosine, as LAVIS evaluates. A
        model imported from transformers' `Blip2ForImageTextRetrieval` carries no trained
        temperature (it keeps `init_temp`): score it with "lavis".

    Returns, all (I, T) float32 on the CPU:
      "itc": ITC similarity (best query, cosine) of every pair;
      "itm_i2t": ITM match logit + ITC (by `fusion`) for each image's top-k texts, -inf elsewhere
        (rank texts for an image along a row);
      "itm_t2i": the same for each text's top-k images (rank images for a text along a column).
    A pair that is a candidate in both directions is passed through ITM once. The model runs in
    eval mode (no dropout) and is put back in the mode it came in.
    """
    _check_inputs(image_embeds, input_ids, text_mask, batch_size)
    if k_test < 1:
        raise ValueError(f"`k_test` must be at least 1, got {k_test}")
    itc_scale = _fusion_scale(model, fusion)
    num_images, num_texts = image_embeds.shape[0], input_ids.shape[0]
    was_training = model.training
    model.eval()
    try:
        # step 1: ITC for all pairs, from features computed once per image and once per text
        itc = _itc_matrix(
            model,
            _image_feats(model, image_embeds, batch_size),
            _text_feats(model, input_ids, text_mask, batch_size),
            batch_size,
        )  # (I, T)

        # step 2: the candidates, each image's top-k texts and each text's top-k images by ITC
        top_texts = itc.topk(min(k_test, num_texts), dim=1).indices  # (I, k)
        top_images = itc.topk(min(k_test, num_images), dim=0).indices  # (k, T)
        cand_i2t = torch.zeros_like(itc, dtype=torch.bool).scatter_(1, top_texts, True)
        cand_t2i = torch.zeros_like(itc, dtype=torch.bool).scatter_(0, top_images, True)

        # step 3: ITM on the union of candidate pairs, in chunks (pairs sorted by image)
        pairs = (cand_i2t | cand_t2i).nonzero()  # (P, 2): (image, text)
        match = _itm_match_logits(model, image_embeds, input_ids, text_mask, pairs, batch_size, progress)

        # step 4: final score = ITM + ITC (a logit, or LAVIS's cosine) on candidates, -inf elsewhere
        rescored = torch.full_like(itc, float("-inf"))
        rescored[pairs[:, 0], pairs[:, 1]] = match + itc[pairs[:, 0], pairs[:, 1]] * itc_scale
        ninf = float("-inf")
        return {
            "itc": itc,
            "itm_i2t": rescored.masked_fill(~cand_i2t, ninf),
            "itm_t2i": rescored.masked_fill(~cand_t2i, ninf),
        }
    finally:
        model.train(was_training)


def _fusion_scale(model: Stage1Model, fusion: str) -> float:
    """What the ITC cosine is multiplied by before ITM's logit is added: 1 / temperature or 1."""
    if fusion == "lavis":
        return 1.0
    if fusion != "logit":
        raise ValueError(f"`fusion` must be 'logit' (ITM + ITC logit) or 'lavis' (ITM + cosine), got {fusion!r}")
    temp = float(getattr(model, "temp", float("nan")))
    config = getattr(model, "config", None)
    if hasattr(config, "temp_min") and hasattr(config, "temp_max"):  # BLIP clamps before each step
        temp = min(max(temp, config.temp_min), config.temp_max)
    if not temp > 0:  # also NaN: a model without a temperature
        raise ValueError(
            f"fusion='logit' divides ITC by the model's temperature, but {type(model).__name__}.temp is "
            f"{temp}; use fusion='lavis' (ITM + bare cosine) for a model without a positive temperature."
        )
    return 1.0 / temp


def _itm_match_logits(
    model: Stage1Model,
    image_embeds: Tensor,
    input_ids: Tensor,
    text_mask: Tensor,
    pairs: Tensor,
    batch_size: int,
    progress: bool | None,
) -> Tensor:
    """ITM logit of the "match" class (index 1), averaged over queries, of each (image, text) pair: (P,)."""
    device = _device(model)
    chunks = pairs.split(batch_size)
    show = len(chunks) > 20 if progress is None else progress
    out = []
    for chunk in tqdm(chunks, desc="ITM re-ranking", unit="batch", disable=not show):
        img, txt = chunk[:, 0], chunk[:, 1]
        logits = model.itm_logits(
            image_embeds[img.to(image_embeds.device)].to(device),
            input_ids[txt.to(input_ids.device)].to(device),
            text_mask[txt.to(text_mask.device)].to(device),
        )  # (b, 2)
        out.append(logits[:, 1].float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def zero_shot_classification(
    model: Stage1Model,
    image_embeds: Tensor,
    class_prompts_ids: Tensor,
    class_prompts_mask: Tensor,
    *,
    batch_size: int = 64,
) -> Tensor:
    """Predicted class (I,) of each image: the argmax over classes of the ITC similarity between
    the image and each class's prompt (class_prompts_ids / _mask: (C, t), one prompt per class,
    e.g. "a photo of a {label}"). Returned on the CPU; the model runs in eval mode."""
    _check_inputs(image_embeds, class_prompts_ids, class_prompts_mask, batch_size)
    was_training = model.training
    model.eval()
    try:
        itc = _itc_matrix(
            model,
            _image_feats(model, image_embeds, batch_size),
            _text_feats(model, class_prompts_ids, class_prompts_mask, batch_size),
            batch_size,
        )  # (I, C)
    finally:
        model.train(was_training)
    return itc.argmax(dim=1)
