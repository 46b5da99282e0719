"""The Q-Former, whole, in one file.

A BERT encoder whose input is [learned queries; text]. Every `cross_attention_freq`-th layer lets
the *query* positions cross-attend to the frozen image tokens; text positions never see the image
directly, only through self-attention to the queries (if the mask allows it). Each layer has two
feed-forward blocks, one for query positions and one for text positions.

Two things here are beyond a plain BERT, and are why this is our own module rather than a subclass
of transformers' `Blip2QFormerModel` (with which it is proven equal by the parity tests):

* the image's cross-attention keys/values can be computed once (`image_kv`) and passed back in, so
  the ITC, ITM and ITG passes of one training step project the image only once;
* a pass can return the self-attention keys/values of its query positions (`return_cache`) and a
  later text-only pass can attend to them (`past_kv`). This is how the ITG pass reuses the ITC
  query pass, as the original does: under the multimodal-causal mask the query rows see only
  queries, so their states are exactly those of the query-only pass.

`forward_queries` is the query path that stage 2 feeds to the LLM: BLIP-2's query-only pass, or
InstructBLIP's, in which the instruction's tokens join the queries in self-attention (both ways)
while only the queries cross-attend to the image.

Legend: b batch, q queries, t text tokens, n image tokens, d width, d_v vision width, h heads,
hs head size (d / h).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qformer.config import QFormerConfig
from qformer.masks import bidirectional_mask

KV = tuple[Tensor, Tensor]  # keys and values, each (b, h, n, hs)


class TrunkConfig(Protocol):
    """The BERT fields that `Attention`, `FeedForward` and `TextEmbeddings` read. `QFormerConfig`
    has them, and so does `qformer.blip.BlipConfig`: BLIP's text model is built from the same blocks."""

    hidden_size: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    hidden_dropout: float
    attention_dropout: float
    vocab_size: int
    max_position_embeddings: int
    pad_token_id: int


ACTIVATIONS = {
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
}


class Attention(nn.Module):
    """Multi-head attention followed by BERT's post-LN residual block (dense, dropout, LayerNorm)."""

    def __init__(self, config: TrunkConfig, kv_width: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.attention_dropout = config.attention_dropout
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(kv_width, d)
        self.v = nn.Linear(kv_width, d)
        self.out = nn.Linear(d, d)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def _heads(self, x: Tensor) -> Tensor:
        b, L, _ = x.shape
        return x.view(b, L, self.num_heads, -1).transpose(1, 2)  # (b, h, L, hs)

    def kv(self, x: Tensor) -> KV:
        """Keys and values of `x` (b, L, kv_width), each (b, h, L, hs)."""
        return self._heads(self.k(x)), self._heads(self.v(x))

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        kv: KV | None = None,
        past_kv: KV | None = None,
        rows: slice | None = None,
    ) -> tuple[Tensor, KV]:
        """Attend from `x` (b, L, d); `kv` given means cross-attention, else self-attention.

        `past_kv` (self-attention only) are keys/values of earlier positions placed before those
        of `x`. `rows`: compute the output of these positions of `x` only (every position is still
        a key); the rows of `mask` are those of all of `x`. Returns the block output (b, L, d), or
        (b, len(rows), d), and the keys/values that were attended to.
        """
        inputs = x
        if rows is not None:
            x = x[:, rows]
            if mask is not None and mask.shape[2] != 1:
                mask = mask[:, :, rows]
        b, L, d = x.shape
        q = self._heads(self.q(x))  # (b, h, L, hs)
        if kv is None:
            k, v = self.kv(inputs)
            if past_kv is not None:
                k = torch.cat([past_kv[0], k], dim=2)  # (b, h, P + L, hs)
                v = torch.cat([past_kv[1], v], dim=2)
        else:
            k, v = kv
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attention_dropout if self.training else 0.0
        )  # (b, h, L, hs)
        y = y.transpose(1, 2).reshape(b, L, d)
        return self.norm(x + self.dropout(self.out(y))), (k, v)


class FeedForward(nn.Module):
    """BERT's FFN with its post-LN residual."""

    def __init__(self, config: TrunkConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACTIVATIONS[config.hidden_act]()
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout(self.fc2(self.act(self.fc1(x)))))


class QFormerLayer(nn.Module):
    def __init__(self, config: QFormerConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, config.hidden_size)
        self.cross_attn = (
            Attention(config, config.vision_width) if config.has_cross_attention(layer_idx) else None
        )
        self.ffn_query = FeedForward(config)
        self.ffn_text = FeedForward(config)

    def forward(
        self,
        x: Tensor,
        *,
        num_queries: int,
        mask: Tensor | None,
        image_kv: KV | None,
        past_kv: KV | None,
        rows: slice | None = None,
    ) -> tuple[Tensor, KV]:
        """x (b, q + t, d) with the first `num_queries` positions being queries. `rows`: the
        positions whose outputs are computed (all by default); the others are only keys."""
        x, (k, v) = self.self_attn(x, mask=mask, past_kv=past_kv, rows=rows)
        kept_queries = num_queries if rows is None else len(range(num_queries)[rows])
        query, text = x[:, :kept_queries], x[:, kept_queries:]  # (b, q, d), (b, t, d)
        parts = []
        if kept_queries:
            if self.cross_attn is not None:
                query, _ = self.cross_attn(query, kv=image_kv)  # cross-attention on queries only
            parts.append(self.ffn_query(query))
        if text.shape[1]:
            parts.append(self.ffn_text(text))
        # keys/values of this pass's query positions, for a later pass to attend to
        return torch.cat(parts, dim=1), (k[:, :, :num_queries], v[:, :, :num_queries])


class TextEmbeddings(nn.Module):
    """Word + absolute position embeddings for text; queries get neither. The [queries; text]
    concatenation goes through LayerNorm and dropout together (also with no text)."""

    def __init__(self, config: TrunkConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, input_ids: Tensor | None, queries: Tensor | None, *, position_offset: int = 0) -> Tensor:
        """`position_offset`: the position of the first text token; 0 (text starts at 0) except when
        decoding one token at a time after a cache of the earlier ones."""
        parts = [] if queries is None else [queries]
        if input_ids is not None:
            t = input_ids.shape[1]
            positions = torch.arange(position_offset, position_offset + t, device=input_ids.device)
            parts.append(self.word(input_ids) + self.position(positions))
        return self.dropout(self.norm(torch.cat(parts, dim=1)))


@dataclass
class QFormerOutput:
    hidden_states: Tensor  # (b, q + t, d), queries first; only the rows asked for by `outputs`
    num_queries: int
    # per layer, self-attention keys/values of the query positions; see `QFormer.forward`
    query_cache: list[KV] | None = None

    @property
    def query_output(self) -> Tensor:
        return self.hidden_states[:, : self.num_queries]  # (b, q, d)

    @property
    def text_output(self) -> Tensor:
        return self.hidden_states[:, self.num_queries :]  # (b, t, d)


class QFormer(nn.Module):
    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.query_tokens = nn.Parameter(torch.empty(1, config.num_query_tokens, config.hidden_size))
        self.embeddings = TextEmbeddings(config)
        self.layers = nn.ModuleList(QFormerLayer(config, i) for i in range(config.num_layers))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """BERT's initialisation. The queries are normal(0, 0.02) as in the original; never zeros
        (transformers 5 zero-initialises them, and the first backward then explodes on them)."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.query_tokens, std=std)
        self.embeddings.word.weight[self.config.pad_token_id].zero_()  # as BERT's init

    @property
    def cross_attention_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.cross_attn is not None]

    def image_kv(self, image_embeds: Tensor) -> list[KV | None]:
        """Cross-attention keys/values of the image tokens (b, n, d_v) for every layer (None where
        a layer has no cross-attention). Compute once per image, pass to as many passes as needed."""
        check_image_tokens(image_embeds, self.config.vision_width)
        dtype = self.query_tokens.dtype
        image_embeds = image_embeds.to(dtype)
        return [
            layer.cross_attn.kv(image_embeds) if layer.cross_attn is not None else None
            for layer in self.layers
        ]

    def forward(
        self,
        *,
        input_ids: Tensor | None = None,
        mask: Tensor | None = None,
        image_embeds: Tensor | None = None,
        image_kv: list[KV | None] | None = None,
        use_queries: bool = True,
        past_kv: list[KV] | None = None,
        return_cache: bool = False,
        outputs: Literal["all", "queries", "first"] = "all",
    ) -> QFormerOutput:
        """One pass over [queries; text].

        input_ids: (b, t) text, or None for a query-only pass.
        mask: boolean (b, 1, rows, keys) from `qformer.masks`, or None to let every position see
            every other one (the query-only pass needs none).
        image_embeds / image_kv: the image, as tokens (b, n, d_v) or as `image_kv(tokens)`; needed
            whenever queries are used.
        use_queries: False for text-only passes (ITC text side, ITG on a cache).
        past_kv: `query_cache` of an earlier pass; the text then attends to those query keys as if
            the queries were present (the mask's keys are [cached queries; text]).
        return_cache: keep each layer's query keys/values in the output's `query_cache`.
        outputs: the positions whose last-layer outputs are computed: "all"; "queries" (the ITM
            and instruction passes read nothing else); "first" (the [CLS] of a text-only pass, all
            that ITC reads of it). The last layer then skips the query projection, the attention
            and the feed-forward of the other rows (their keys and values are still computed), so
            `hidden_states` holds only the rows asked for, with the values the full pass gives them.
        """
        cfg = self.config
        # step 1: validate the inputs, so that mistakes read as what to change, not as torch errors
        if input_ids is None and not use_queries:
            raise ValueError("A pass needs text (`input_ids`) or queries (`use_queries=True`).")
        if use_queries and past_kv is not None:
            raise ValueError("`past_kv` replaces the queries: pass `use_queries=False` with it.")
        if use_queries and image_kv is None:
            if image_embeds is None:
                raise ValueError("A pass with queries needs the image: give `image_embeds` or `image_kv`.")
            image_kv = self.image_kv(image_embeds)
        if input_ids is not None:
            self._check_text(input_ids)
        if outputs not in ("all", "queries", "first"):
            raise ValueError(f"`outputs` must be 'all', 'queries' or 'first', not {outputs!r}.")
        if outputs == "queries" and not use_queries:
            raise ValueError("`outputs='queries'` needs a pass with queries (`use_queries=True`).")
        if outputs == "first" and use_queries:
            raise ValueError("`outputs='first'` is the [CLS] of a text-only pass: pass `use_queries=False` with it.")

        # step 2: embed [queries; text]
        b = input_ids.shape[0] if input_ids is not None else _kv_batch(image_kv)
        queries = self.query_tokens.expand(b, -1, -1) if use_queries else None
        x = self.embeddings(input_ids, queries)  # (b, q + t, d)
        num_queries = cfg.num_query_tokens if use_queries else 0

        # step 3: the layers; queries cross-attend to the image where a layer has cross-attention
        last_rows = {"all": None, "queries": slice(0, num_queries), "first": slice(0, 1)}[outputs]
        cache = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(
                x,
                num_queries=num_queries,
                mask=mask,
                image_kv=image_kv[i] if image_kv is not None else None,
                past_kv=past_kv[i] if past_kv is not None else None,
                rows=last_rows if i == len(self.layers) - 1 else None,
            )
            cache.append(layer_cache)
        if last_rows is not None:
            num_queries = len(range(num_queries)[last_rows])
        return QFormerOutput(x, num_queries, cache if return_cache else None)

    def forward_queries(
        self,
        image_embeds: Tensor | None = None,
        *,
        image_kv: list[KV | None] | None = None,
        instruction_ids: Tensor | None = None,
        instruction_mask: Tensor | None = None,
    ) -> Tensor:
        """The query outputs (b, q, d) for an image, as tokens (b, n, d_v) or `image_kv(tokens)`.

        Without an instruction: BLIP-2's query-only pass, exactly `forward(image_embeds=...)`.
        With `instruction_ids` (b, t) (InstructBLIP): one pass over [queries; instruction] under
        `bidirectional_mask`, so queries and instruction tokens attend to each other; as in every
        pass, only the query positions cross-attend to the image. `instruction_mask` is the
        tokenizer's attention mask (b, t), 1 for real tokens; padding is never attended to, so it
        leaves the query outputs unchanged. None: no padding. The instruction's own outputs are
        dropped: only the queries go on to the LLM.
        """
        if instruction_ids is None:
            if instruction_mask is not None:
                raise ValueError("`instruction_mask` was given without `instruction_ids`: pass both, or neither.")
            return self(image_embeds=image_embeds, image_kv=image_kv).query_output
        if instruction_mask is None:
            instruction_mask = torch.ones_like(instruction_ids)
        if instruction_mask.shape != instruction_ids.shape:
            raise ValueError(
                f"`instruction_mask` {tuple(instruction_mask.shape)} must have the shape of "
                f"`instruction_ids` {tuple(instruction_ids.shape)}: pass the tokenizer's attention_mask."
            )
        images = image_embeds.shape[0] if image_embeds is not None else _kv_batch(image_kv)
        if instruction_ids.shape[0] != images:
            raise ValueError(
                f"{images} images but {instruction_ids.shape[0]} instructions: pass one instruction per image."
            )
        mask = bidirectional_mask(self.config.num_query_tokens, instruction_mask)  # (b, 1, q + t, q + t)
        out = self(input_ids=instruction_ids, mask=mask, image_embeds=image_embeds, image_kv=image_kv, outputs="queries")
        return out.query_output  # (b, q, d)

    def _check_text(self, input_ids: Tensor) -> None:
        cfg = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"`input_ids` must be (batch, length), got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(
                f"Text of {input_ids.shape[1]} tokens is longer than the position table "
                f"(max_position_embeddings={cfg.max_position_embeddings}); truncate it in the "
                f"tokenizer (e.g. `max_length=32` as in the original)."
            )
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= cfg.vocab_size):
            raise ValueError(
                f"Token ids must lie in [0, {cfg.vocab_size}) (vocab_size), got ids from "
                f"{int(input_ids.min())} to {int(input_ids.max())}: is the tokenizer the one this "
                f"Q-Former was built with?"
            )


def check_image_tokens(image_embeds: Tensor, vision_width: int) -> None:
    if image_embeds.dim() != 3 or image_embeds.shape[-1] != vision_width:
        raise ValueError(
            f"Image tokens must be (batch, tokens, {vision_width}) to match QFormerConfig.vision_width, "
            f"got shape {tuple(image_embeds.shape)}. Use the vision tower the Q-Former was built for, "
            f"or set `vision_width={image_embeds.shape[-1]}`."
        )


def _kv_batch(image_kv: list[KV | None] | None) -> int:
    for kv in image_kv or []:
        if kv is not None:
            return kv[0].shape[0]
    raise ValueError("Cannot infer the batch size: give `input_ids` or the image.")

