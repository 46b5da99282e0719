"""Stage-1 losses (ITC, ITM, ITG) as standalone functions, and the cross-process gathers.

Everything works in one process without `torch.distributed` initialised: the gathers are then the
identity and the rank is 0. With several processes, each process holds a local batch of b pairs and
the "world" batch is the concatenation over ranks, B = b * world_size.

Legend: b local batch, B world batch, q queries, e embedding width, t text tokens, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate `x` over processes along dim 0; no gradient flows to other ranks' copies."""
    _, world = rank_and_world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` over processes along dim 0, with gradients flowing back to every rank."""
    _, world = rank_and_world()
    if world == 1:
        return x
    return _GatherWithGrad.apply(x)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient of the gathered tensor and keeps
    this rank's slice. (torch.distributed.nn's all_gather hands non-contiguous gradients to gloo's
    all-to-all, which then returns wrong values; an all_reduce of a contiguous copy is safe on every
    backend, at the cost of moving the whole gathered gradient.)"""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rank, world = rank_and_world()
        ctx.rank, ctx.size = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad.narrow(0, ctx.rank * ctx.size, ctx.size)


def pad_text_to_world(input_ids: Tensor, text_mask: Tensor, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad (b, t) text to the longest t over all processes, so the texts can be gathered
    (padding is masked out everywhere, so no output changes)."""
    _, world = rank_and_world()
    if world == 1:
        return input_ids, text_mask
    longest = torch.tensor([input_ids.shape[1]], device=input_ids.device)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    extra = int(longest) - input_ids.shape[1]
    if extra == 0:
        return input_ids, text_mask
    return (
        torch.nn.functional.pad(input_ids, (0, extra), value=pad_token_id),
        torch.nn.functional.pad(text_mask, (0, extra), value=0),
    )


@dataclass
class ITCOutput:
    loss: Tensor
    sim_i2t: Tensor  # (b, B): local images against world texts, divided by the temperature
    sim_t2i: Tensor  # (b, B): local texts against world images


def itc_loss(
    image_feats: Tensor,
    text_feats: Tensor,
    temp: Tensor,
    *,
    image_ids: Tensor | None = None,
    label_smoothing: float = 0.1,
    gather_grad: bool = False,
) -> ITCOutput:
    """Image-text contrastive loss with one feature per query.

    image_feats: (b, q, e) normalised projections of the query outputs.
    text_feats: (b, e) normalised projection of the text's [CLS].
    The image-text similarity is the best match over the q queries, divided by `temp`.
    Other ranks' features are gathered without gradient as in the original (`gather_grad=True`
    gathers with gradient, so that a multi-process run has exactly the gradient of one big batch).
    With `image_ids` (b,), targets are spread evenly over all pairs that share an image id.
    """
    rank, _ = rank_and_world()
    gather = gather_with_grad if gather_grad else gather_no_grad
    b = image_feats.shape[0]
    image_all = gather(image_feats)  # (B, q, e)
    text_all = gather(text_feats)  # (B, e)
    sim_i2t = torch.einsum("bqe,ce->bcq", image_feats, text_all).amax(dim=-1) / temp  # (b, B)
    sim_t2i = torch.einsum("be,cqe->bcq", text_feats, image_all).amax(dim=-1) / temp  # (b, B)
    targets = positive_pairs(b, sim_i2t.shape[1], rank, image_ids).float()
    targets = targets / targets.sum(dim=1, keepdim=True)  # one-hot without repeated image ids
    loss = (
        F.cross_entropy(sim_i2t.float(), targets, label_smoothing=label_smoothing)
        + F.cross_entropy(sim_t2i.float(), targets, label_smoothing=label_smoothing)
    ) / 2
    return ITCOutput(loss, sim_i2t, sim_t2i)


def positive_pairs(b: int, B: int, rank: int, image_ids: Tensor | None) -> Tensor:
    """(b, B) boolean: which world items are positives of each local item. Without image ids, the
    item itself (offset by rank * b); with them, every item showing the same image."""
    if image_ids is None:
        pos = torch.zeros(b, B, dtype=torch.bool)
        idx = torch.arange(b)
        pos[idx, rank * b + idx] = True
        return pos
    ids_all = gather_no_grad(image_ids)
    return (image_ids[:, None] == ids_all[None, :]).cpu()


@torch.no_grad()
def sample_itm_negatives(
    sim_i2t: Tensor,
    sim_t2i: Tensor,
    *,
    image_ids: Tensor | None = None,
    exclude: Tensor | None = None,
    hardest: bool = False,
    generator: torch.Generator | None = None,
    pool_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Pick one hard negative text per local image and one hard negative image per local text.

    Negatives are drawn from the world batch in proportion to softmax(similarity), with every
    positive pair (the item itself, or any item with the same image id) excluded, and the pairs
    marked in `exclude` (b, B) too (e.g. items whose caption is the same text). `hardest=True`
    takes the most similar negative instead of sampling (deterministic; used to compare runs).
    `pool_ids` (P,): image ids of P more candidates (a negative pool of earlier batches) whose
    similarities are the last P columns of `sim_i2t` / `sim_t2i`; those sharing an image id with
    the item are excluded too (`image_ids` is then required).
    Returns (neg_text_for_image, neg_image_for_text), each (b,) indices into the world batch
    followed by the pool (an index >= B - P is pool item index - (B - P)).
    """
    rank, _ = rank_and_world()
    b, B = sim_i2t.shape
    P = 0 if pool_ids is None else pool_ids.shape[0]
    if P and image_ids is None:
        raise ValueError("A negative pool (`pool_ids`) needs `image_ids`, to tell its positives from its negatives.")
    pos = positive_pairs(b, B - P, rank, image_ids).to(sim_i2t.device)
    if P:
        pos = torch.cat([pos, image_ids[:, None].to(pos.device) == pool_ids[None, :].to(pos.device)], dim=1)
    if exclude is not None:
        pos = pos | exclude.to(pos.device)
    if bool(pos.all(dim=1).any()):
        raise ValueError(
            "ITM needs a negative for every pair, but some item has no pair with a different "
            "image in the batch: use a batch with at least two distinct images (image_ids)"
            + (" and captions." if exclude is not None else ".")
        )

    def pick(sim: Tensor) -> Tensor:
        sim = sim.float().masked_fill(pos, float("-inf"))
        if hardest:
            return sim.argmax(dim=1)
        weights = sim.softmax(dim=1)
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)

    return pick(sim_i2t), pick(sim_t2i)


def itm_loss(logits: Tensor, num_positives: int, positive_weight: float = 1.0) -> Tensor:
    """logits (3b, 2) for pairs laid out [positives; negatives]: the first `num_positives` rows
    are matches (label 1), the rest are not (label 0). Plain cross-entropy as in the original.

    `positive_weight` weighs the match class (a weighted mean): with b positives and 2b negatives
    a weight of 2 balances the two, so a match probability of 0.5 means even odds instead of
    carrying the 1:2 prior of the batch layout (CapFilt thresholds that probability at 0.5)."""
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    labels[:num_positives] = 1
    weight = None if positive_weight == 1.0 else torch.tensor([1.0, positive_weight], device=logits.device)
    return F.cross_entropy(logits.float(), labels, weight=weight)


def itg_loss(logits: Tensor, labels: Tensor, *, label_smoothing: float = 0.1) -> Tensor:
    """Shifted language-model loss: position i predicts token i + 1.

    logits (b, t, V); labels (b, t) with -100 wherever no loss is wanted (padding)."""
    shifted = logits[:, :-1].float()  # (b, t-1, V)
    targets = labels[:, 1:]  # (b, t-1)
    return F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]),
        targets.reshape(-1),
        ignore_index=-100,
        label_smoothing=label_smoothing,
    )
