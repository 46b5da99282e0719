"""The Q-Former's self-attention masks, one pure function per use.

Every mask is boolean, shaped (b, 1, rows, keys), True where a row may attend to a key; it goes
straight into `scaled_dot_product_attention`, broadcasting over heads. Sequences are laid out as
[queries; text]: positions 0..q-1 are the learned queries, q.. are text tokens.

`text_mask` is the tokenizer's attention mask, (b, t), 1 for real tokens and 0 for padding.
Padding only ever removes *keys*: a padded row still gets a valid (ignored) output, so no row is
ever fully masked and the softmax never sees an empty set.

Legend: b batch, q queries, t text tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _keys(text_mask: Tensor) -> Tensor:
    return text_mask.bool()[:, None, None, :]  # (b, 1, 1, t)


def query_only_mask(batch_size: int, num_queries: int, device: torch.device | None = None) -> Tensor:
    """ITC image side: queries attend to every query (and, in cross-attention, to the image)."""
    return torch.ones(batch_size, 1, num_queries, num_queries, dtype=torch.bool, device=device)


def text_only_mask(text_mask: Tensor) -> Tensor:
    """ITC text side: text attends to non-padding text, bidirectionally; no queries, no image."""
    b, t = text_mask.shape
    return _keys(text_mask).expand(b, 1, t, t)


def bidirectional_mask(num_queries: int, text_mask: Tensor) -> Tensor:
    """ITM, and InstructBLIP's instruction pass (`QFormer.forward_queries`): queries and text all
    see each other (text padding excluded as keys)."""
    b, t = text_mask.shape
    keys = torch.cat([text_mask.new_ones(b, num_queries).bool(), text_mask.bool()], dim=1)
    return keys[:, None, None, :].expand(b, 1, num_queries + t, num_queries + t)


def multimodal_causal_mask(num_queries: int, text_mask: Tensor, *, text_rows_only: bool = False) -> Tensor:
    """ITG: queries see queries only; text token i sees every query and text tokens 0..i.

    With `text_rows_only`, return only the t text rows, (b, 1, t, q + t): the shape needed when the
    query rows come from a cached pass and only the text is computed.
    """
    b, t = text_mask.shape
    q = num_queries
    device = text_mask.device
    query_rows = torch.zeros(q, q + t, dtype=torch.bool, device=device)
    query_rows[:, :q] = True
    causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    text_rows = torch.cat([torch.ones(t, q, dtype=torch.bool, device=device), causal], dim=1)
    rows = text_rows if text_rows_only else torch.cat([query_rows, text_rows], dim=0)  # (r, q+t)
    keys = torch.cat([text_mask.new_ones(b, q).bool(), text_mask.bool()], dim=1)  # (b, q+t)
    return rows[None, None, :, :] & keys[:, None, None, :]
