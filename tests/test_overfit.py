"""A tiny stage-1 model memorises 16 pairs: every loss term closes most of its gap to its minimum."""

import math

import torch

from qformer import QFormerConfig, Stage1Model

N, N_TOKENS, T = 16, 16, 8
CFG = QFormerConfig.from_name(
    "tiny", hidden_size=64, num_heads=4, intermediate_size=128, num_layers=2, num_query_tokens=8,
    vision_width=32, vocab_size=64, dec_token_id=63, hidden_dropout=0.0, attention_dropout=0.0,
)  # fmt: skip


def data():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(N, N_TOKENS, CFG.vision_width, generator=g)
    ids = torch.randint(3, 60, (N, T), generator=g)
    ids[:, 0] = 1  # [CLS]
    lengths = torch.randint(4, T + 1, (N,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return image, ids.masked_fill(mask == 0, CFG.pad_token_id), mask


def smoothed_entropy(classes: int, ls: float = 0.1) -> float:
    """The least cross-entropy a label-smoothed target allows: its own entropy."""
    hit, miss = 1 - ls + ls / classes, ls / classes
    return -hit * math.log(hit) - (classes - 1) * miss * math.log(miss)


def train(steps: int, seed: int = 0) -> list[dict[str, float]]:
    torch.manual_seed(seed)
    model = Stage1Model(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    image, ids, mask = data()
    history = []
    for _ in range(steps):
        out = model(image, ids, mask, generator=gen)
        history.append({k: v.item() for k, v in out.items()})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    return history


def test_every_loss_closes_80_percent_of_its_gap():
    history = train(300)
    first, last = history[0], {k: sum(h[k] for h in history[-5:]) / 5 for k in history[0]}
    minimum = {"itc": smoothed_entropy(N), "itm": 0.0, "itg": smoothed_entropy(CFG.vocab_size)}
    for term, low in minimum.items():
        closed = (first[term] - last[term]) / (first[term] - low)
        assert closed >= 0.8, f"{term}: from {first[term]:.3f} to {last[term]:.3f}, minimum {low:.3f}"
        assert last[term] >= low - 1e-4  # no loss goes below what label smoothing allows


def test_training_is_deterministic_for_a_seed():
    assert train(8, seed=3) == train(8, seed=3)
    assert train(8, seed=3) != train(8, seed=4)
