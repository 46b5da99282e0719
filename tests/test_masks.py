"""Every element of small masks against the rules, written out as loops (the reference)."""

import torch

from qformer import masks

Q = 3
TEXT_MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])  # second caption has two pad tokens
B, T = TEXT_MASK.shape


def is_query(i: int) -> bool:
    return i < Q


def test_query_only_mask_is_all_true():
    m = masks.query_only_mask(2, Q)
    assert m.shape == (2, 1, Q, Q) and m.dtype == torch.bool and bool(m.all())


def test_text_only_mask_excludes_padding_keys_only():
    m = masks.text_only_mask(TEXT_MASK)
    assert m.shape == (B, 1, T, T)
    for b in range(B):
        for i in range(T):
            for j in range(T):
                assert m[b, 0, i, j] == bool(TEXT_MASK[b, j]), (b, i, j)


def test_bidirectional_mask():
    m = masks.bidirectional_mask(Q, TEXT_MASK)
    assert m.shape == (B, 1, Q + T, Q + T)
    for b in range(B):
        for i in range(Q + T):
            for j in range(Q + T):
                key_real = is_query(j) or bool(TEXT_MASK[b, j - Q])
                assert m[b, 0, i, j] == key_real, (b, i, j)


def test_multimodal_causal_mask():
    m = masks.multimodal_causal_mask(Q, TEXT_MASK)
    assert m.shape == (B, 1, Q + T, Q + T)
    for b in range(B):
        for i in range(Q + T):
            for j in range(Q + T):
                if is_query(i):
                    expected = is_query(j)  # queries see queries only
                elif is_query(j):
                    expected = True  # text sees every query
                else:
                    expected = (j <= i) and bool(TEXT_MASK[b, j - Q])  # earlier, real text
                assert m[b, 0, i, j] == expected, (b, i, j)


def test_text_rows_only_is_the_text_block_of_the_full_mask():
    full = masks.multimodal_causal_mask(Q, TEXT_MASK)
    rows = masks.multimodal_causal_mask(Q, TEXT_MASK, text_rows_only=True)
    assert rows.shape == (B, 1, T, Q + T)
    assert torch.equal(rows, full[:, :, Q:])


def test_no_row_is_fully_masked():
    # a fully masked row would make softmax produce NaN
    for m in (
        masks.text_only_mask(TEXT_MASK),
        masks.bidirectional_mask(Q, TEXT_MASK),
        masks.multimodal_causal_mask(Q, TEXT_MASK),
    ):
        assert bool(m.any(dim=-1).all())
