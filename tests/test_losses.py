"""The stage-1 losses against hand computations in plain Python (math, not torch)."""

import math

import pytest
import torch

from qformer.losses import itc_loss, itg_loss, itm_loss, sample_itm_negatives


def smoothed_ce(logits: list[float], target: list[float], ls: float) -> float:
    """Cross-entropy of one row with label smoothing, by hand."""
    c = len(logits)
    m = max(logits)
    log_z = m + math.log(sum(math.exp(x - m) for x in logits))
    smoothed = [(1 - ls) * t + ls / c for t in target]
    return -sum(s * (x - log_z) for s, x in zip(smoothed, logits))


# three pairs, two queries, 2-d features (not normalised: the loss does not care)
IMG = [
    [[1.0, 0.0], [0.0, 0.5]],
    [[0.2, 0.9], [-0.3, 0.1]],
    [[-1.0, 0.4], [0.5, -0.5]],
]
TXT = [[0.8, 0.1], [0.1, 1.0], [-0.6, 0.3]]
TEMP = 0.5


def hand_sims():
    dot = lambda a, b: a[0] * b[0] + a[1] * b[1]  # noqa: E731
    i2t = [[max(dot(q, t) for q in IMG[i]) / TEMP for t in TXT] for i in range(3)]
    t2i = [[max(dot(q, TXT[j]) for q in IMG[i]) / TEMP for i in range(3)] for j in range(3)]
    return i2t, t2i


def test_itc_three_pairs_by_hand():
    i2t, t2i = hand_sims()
    onehot = [[1.0 if i == j else 0.0 for j in range(3)] for i in range(3)]
    expected = sum(
        smoothed_ce(i2t[i], onehot[i], 0.1) + smoothed_ce(t2i[i], onehot[i], 0.1) for i in range(3)
    ) / 6
    out = itc_loss(torch.tensor(IMG), torch.tensor(TXT), torch.tensor(TEMP), label_smoothing=0.1)
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert torch.allclose(out.sim_i2t, torch.tensor(i2t))
    assert torch.allclose(out.sim_t2i, torch.tensor(t2i))


def test_itc_soft_targets_for_repeated_image_ids():
    i2t, t2i = hand_sims()
    ids = [7, 7, 3]  # pairs 0 and 1 show the same image
    soft = [[float(ids[i] == ids[j]) / ids.count(ids[i]) for j in range(3)] for i in range(3)]
    assert soft[0] == [0.5, 0.5, 0.0]
    expected = sum(smoothed_ce(i2t[i], soft[i], 0.1) + smoothed_ce(t2i[i], soft[i], 0.1) for i in range(3)) / 6
    out = itc_loss(
        torch.tensor(IMG), torch.tensor(TXT), torch.tensor(TEMP), image_ids=torch.tensor(ids), label_smoothing=0.1
    )
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)


def test_itm_labels_first_third_positive():
    logits = [[0.3, 1.2], [2.0, -1.0], [0.0, 0.0]]
    labels = [1, 0, 0]
    expected = sum(smoothed_ce(row, [float(c == y) for c in range(2)], 0.0) for row, y in zip(logits, labels)) / 3
    assert itm_loss(torch.tensor(logits), num_positives=1).item() == pytest.approx(expected, abs=1e-6)
    # positive_weight 2: the match row counts twice in a weighted mean (weights 2, 1, 1)
    terms = [smoothed_ce(row, [float(c == y) for c in range(2)], 0.0) for row, y in zip(logits, labels)]
    weighted = (2 * terms[0] + terms[1] + terms[2]) / 4
    assert itm_loss(torch.tensor(logits), num_positives=1, positive_weight=2.0).item() == pytest.approx(weighted, abs=1e-6)
    # with balanced weights a constant score settles at even odds: the loss is least at p(match) = 1/2
    grid = torch.linspace(-3, 3, 601)
    rows = torch.stack([torch.zeros_like(grid), grid], 1)  # logit of "match" = grid
    losses = [itm_loss(r.expand(3, 2).clone(), num_positives=1, positive_weight=2.0) for r in rows]
    assert abs(grid[int(torch.stack(losses).argmin())].item()) < 0.011
    plain = [itm_loss(r.expand(3, 2).clone(), num_positives=1) for r in rows]
    assert grid[int(torch.stack(plain).argmin())].item() == pytest.approx(-0.693, abs=0.011)  # log(1/2): p = 1/3


def test_hardest_negatives_skip_positives():
    # the positive (diagonal) is the most similar in every row: it must never be chosen
    sim = torch.tensor([[9.0, 1.0, 5.0], [4.0, 9.0, 2.0], [0.0, 3.0, 9.0]])
    neg_text, neg_image = sample_itm_negatives(sim, sim.clone(), hardest=True)
    assert neg_text.tolist() == [2, 0, 1]
    assert neg_image.tolist() == [2, 0, 1]


def test_hardest_negatives_skip_same_image_ids():
    sim = torch.tensor([[9.0, 8.0, 5.0], [8.0, 9.0, 2.0], [0.0, 3.0, 9.0]])
    neg_text, _ = sample_itm_negatives(sim, sim.clone(), image_ids=torch.tensor([1, 1, 2]), hardest=True)
    assert neg_text.tolist() == [2, 2, 1]  # items 0 and 1 share an image: neither is the other's negative


def test_sampled_negatives_never_positive_and_follow_softmax():
    gen = torch.Generator().manual_seed(0)
    sim = torch.tensor([[0.0, 2.0, 0.0, 0.0], [1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]])
    counts = torch.zeros(4, 4)
    for _ in range(3000):
        neg_text, _ = sample_itm_negatives(sim, sim, generator=gen)
        counts[torch.arange(4), neg_text] += 1
    assert counts.diagonal().sum() == 0
    # row 0: softmax over the negatives {1: 2.0, 2: 0.0, 3: 0.0}
    p = math.exp(2) / (math.exp(2) + 2)
    assert counts[0, 1].item() / 3000 == pytest.approx(p, abs=0.03)


def test_pool_negatives_skip_the_items_own_image_id_and_index_after_the_batch():
    # 2 batch items (ids 1, 2) and a pool of 3 (ids 1, 3, 2): pool column 0 shows item 0's image
    sim = torch.tensor([[9.0, 1.0, 8.0, 2.0, 0.0], [1.0, 9.0, 0.0, 3.0, 8.5]])
    ids, pool_ids = torch.tensor([1, 2]), torch.tensor([1, 3, 2])
    neg_text, neg_image = sample_itm_negatives(sim, sim.clone(), image_ids=ids, pool_ids=pool_ids, hardest=True)
    assert neg_text.tolist() == [3, 3]  # pool item 1 (index 2 + 1); never pool 0 (item 0) or pool 2 (item 1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        drawn, _ = sample_itm_negatives(sim, sim, image_ids=ids, pool_ids=pool_ids, generator=gen)
        assert drawn[0].item() not in (0, 2) and drawn[1].item() not in (1, 4)
    with pytest.raises(ValueError, match="needs `image_ids`"):
        sample_itm_negatives(sim, sim, pool_ids=pool_ids)


def test_itm_needs_two_distinct_images():
    sim = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="two distinct images"):
        sample_itm_negatives(sim, sim, image_ids=torch.tensor([4, 4]))


def test_itg_shift_and_smoothing_by_hand():
    # tokens [DEC]=3, 1, 2, pad; position i predicts token i + 1; the pad label is -100
    logits = [[[0.1, 0.5, -0.2, 0.0], [1.0, 0.0, 0.3, -1.0], [0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]]]
    labels = [[3, 1, 2, -100]]
    onehot = lambda k: [float(c == k) for c in range(4)]  # noqa: E731
    expected = (smoothed_ce(logits[0][0], onehot(1), 0.1) + smoothed_ce(logits[0][1], onehot(2), 0.1)) / 2
    got = itg_loss(torch.tensor(logits), torch.tensor(labels), label_smoothing=0.1)
    assert got.item() == pytest.approx(expected, abs=1e-6)
