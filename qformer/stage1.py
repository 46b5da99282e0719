"""Stage 1, representation learning: the Q-Former with its heads and the ITC, ITM, ITG losses.

The vision tower is not in here: this model takes the frozen tower's tokens (b, n, d_v), from a
live tower or from the feature cache, so it is the same code either way. Everything in this module
trains: queries, Q-Former, `ln_vision`, the projections, the ITM and LM heads and the temperature.

Legend: b batch, q queries, t text tokens, n image tokens, d width, d_v vision width,
e embedding width (ITC), V vocabulary.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qformer import masks
from qformer.checkpoint import CheckpointError, load_state_dict_strict, read_model_dir, save_model
from qformer.config import QFormerConfig
from qformer.losses import (
    gather_no_grad,
    gather_with_grad,
    itc_loss,
    itg_loss,
    itm_loss,
    pad_text_to_world,
    rank_and_world,
    sample_itm_negatives,
)
from qformer.model import ACTIVATIONS, KV, QFormer, TrunkConfig, check_image_tokens


class LMHead(nn.Module):
    """BERT's prediction head. The output matrix is the word-embedding matrix (tied, as BERT and
    the original do), passed in at call time so that the checkpoint holds one copy of it."""

    def __init__(self, config: TrunkConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]()  # BERT's head uses the trunk's activation
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: Tensor, word_embeddings: Tensor) -> Tensor:
        h = self.norm(self.act(self.dense(hidden)))
        return F.linear(h, word_embeddings, self.bias)  # (b, t, V)


def _pad_right(x: Tensor, length: int, value: int) -> Tensor:
    return F.pad(x, (0, length - x.shape[1]), value=value) if x.shape[1] < length else x


class NegativePool:
    """The last `size` training items of this process, kept without gradient as more candidates for
    ITM's hard negatives: their frozen tokens, text, image id, and the ITC features they had when
    they were trained on (a few steps stale; used only to choose negatives, never in a loss).

    In-batch mining only finds a negative that differs from the positive in one detail when the
    batch happens to hold one; BLIP-2 draws from a batch gathered over 16 GPUs (1,600 pairs). A
    pool gives a small batch that reach. It is not saved with checkpoints: a resumed run refills it.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"A negative pool needs a size of at least 1, got {size}")
        self.size = size
        self.items: dict[str, Tensor] | None = None

    def __len__(self) -> int:
        return 0 if self.items is None else self.items["image_ids"].shape[0]

    def __getattr__(self, name: str) -> Tensor:
        items = self.__dict__.get("items")
        if items is None or name not in items:
            raise AttributeError(name)
        return items[name]

    @torch.no_grad()
    def push(self, *, tokens: Tensor, input_ids: Tensor, text_mask: Tensor, image_ids: Tensor,
             image_feats: Tensor, text_feats: Tensor, pad_token_id: int) -> None:  # fmt: skip
        new = dict(tokens=tokens, input_ids=input_ids, text_mask=text_mask, image_ids=image_ids,
                   image_feats=image_feats.float(), text_feats=text_feats.float())  # fmt: skip
        new = {k: v.detach() for k, v in new.items()}
        if self.items is not None:
            length = max(new["input_ids"].shape[1], self.items["input_ids"].shape[1])
            for items in (new, self.items):
                items["input_ids"] = _pad_right(items["input_ids"], length, pad_token_id)
                items["text_mask"] = _pad_right(items["text_mask"], length, 0)
            new = {k: torch.cat([self.items[k], v]) for k, v in new.items()}
        self.items = {k: v[-self.size :] for k, v in new.items()}


OBJECTIVES = ("itc", "itm", "itg")


def check_loss_weights(weights: dict[str, float] | None) -> dict[str, float]:
    """All three stage-1 objectives' weights, 1 for any not given; a clear error for an unknown
    objective or a weight that is negative, not finite, or leaves every objective at zero."""
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(OBJECTIVES))
    if unknown:
        raise ValueError(f"`loss_weights` has unknown objectives {unknown}; the stage-1 objectives are {list(OBJECTIVES)}.")
    out = {k: weights.get(k, 1.0) for k in OBJECTIVES}
    for k, v in out.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"`loss_weights.{k}` must be a finite number >= 0, got {v!r}.")
        out[k] = float(v)
    if not any(out.values()):
        raise ValueError("`loss_weights` sets every objective to 0: nothing would train.")
    return out


class Stage1Model(nn.Module):
    def __init__(
        self,
        config: QFormerConfig,
        *,
        itm_negatives: Literal["sample", "hardest"] = "sample",
        itc_gather_grad: bool = False,
        label_smoothing: float = 0.1,
        reuse_image_kv: bool = True,
        reuse_query_cache: bool = True,
        itm_negative_pool: int = 0,
        loss_weights: dict[str, float] | None = None,
    ) -> None:
        """
        itm_negatives: "sample" draws ITM negatives from softmax(similarity) as the original;
            "hardest" takes the most similar one (deterministic, to compare runs).
        itm_negative_pool: in training, ITM also draws its negatives from this many items of earlier
            batches (`NegativePool`; 0: from the batch alone, as the original). Needs `image_ids`.
        itc_gather_grad: gather other ranks' ITC features with gradient (the original: without).
        loss_weights: weights of "itc", "itm" and "itg" in the summed loss (missing ones: 1; the
            original sums the three unweighted). The returned per-objective losses stay unweighted.
        reuse_image_kv / reuse_query_cache: the two reuses that make a step cheaper (see
            `qformer.model`); turning them off recomputes everything and must give the same losses.
        """
        super().__init__()
        if itm_negatives not in ("sample", "hardest"):
            raise ValueError(f"`itm_negatives` must be 'sample' or 'hardest', got {itm_negatives!r}")
        self.config = config
        self.loss_weights = check_loss_weights(loss_weights)
        self.itm_negatives = itm_negatives
        self.itc_gather_grad = itc_gather_grad
        self.label_smoothing = label_smoothing
        self.reuse_image_kv = reuse_image_kv
        self.reuse_query_cache = reuse_query_cache
        self.itm_negative_pool = itm_negative_pool
        self.negative_pool = NegativePool(itm_negative_pool) if itm_negative_pool else None

        d = config.hidden_size
        self.ln_vision = nn.LayerNorm(config.vision_width, eps=config.vision_layer_norm_eps)  # fp32
        self.qformer = QFormer(config)
        self.vision_proj = nn.Linear(d, config.embed_dim)
        self.text_proj = nn.Linear(d, config.embed_dim)
        self.itm_head = nn.Linear(d, 2)
        self.lm_head = LMHead(config)
        self.temp = nn.Parameter(torch.tensor(config.init_temp))  # no clamp in BLIP-2
        self._init_heads()

    @torch.no_grad()
    def _init_heads(self) -> None:
        std = self.config.initializer_range
        for m in (self.vision_proj, self.text_proj, self.itm_head, self.lm_head.dense):
            nn.init.normal_(m.weight, std=std)
            nn.init.zeros_(m.bias)

    def vision_tokens(self, image_embeds: Tensor) -> Tensor:
        """The trainable LayerNorm on the frozen tower's tokens (b, n, d_v), computed in fp32."""
        check_image_tokens(image_embeds, self.config.vision_width)
        return self.ln_vision(image_embeds.float())

    # ------------------------------------------------------------------ features (inference)
    def encode_image(self, image_embeds: Tensor) -> tuple[Tensor, Tensor]:
        """Frozen tokens (b, n, d_v) -> query outputs (b, q, d) and normalised ITC features (b, q, e)."""
        image = self.vision_tokens(image_embeds)
        out = self.qformer(image_embeds=image).query_output
        return out, F.normalize(self.vision_proj(out), dim=-1)

    def encode_text(self, input_ids: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Text (b, t) -> hidden states (b, t, d) and the normalised ITC feature of [CLS] (b, e)."""
        out = self.qformer(input_ids=input_ids, mask=masks.text_only_mask(text_mask), use_queries=False)
        hidden = out.hidden_states
        return hidden, F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def text_features(self, input_ids: Tensor, text_mask: Tensor) -> Tensor:
        """The normalised ITC feature (b, e) of each text's [CLS]: `encode_text` without the other
        rows' last-layer outputs, which ITC never reads."""
        out = self.qformer(input_ids=input_ids, mask=masks.text_only_mask(text_mask), use_queries=False, outputs="first")
        return F.normalize(self.text_proj(out.hidden_states[:, 0]), dim=-1)

    def itc_scores(self, image_feats: Tensor, text_feats: Tensor) -> Tensor:
        """Cosine similarity (best query) of every image (I, q, e) with every text (T, e): (I, T)."""
        return torch.einsum("iqe,te->itq", image_feats, text_feats).amax(dim=-1)

    def itm_logits(self, image_embeds: Tensor, input_ids: Tensor, text_mask: Tensor) -> Tensor:
        """ITM logits (b, 2) of pairs (image_embeds[i], text[i]), averaged over the queries."""
        image = self.vision_tokens(image_embeds)
        mask = masks.bidirectional_mask(self.config.num_query_tokens, text_mask)
        out = self.qformer(input_ids=input_ids, mask=mask, image_embeds=image, outputs="queries")
        return self.itm_head(out.query_output).mean(dim=1)

    # ------------------------------------------------------------------ training
    def forward(
        self,
        image_embeds: Tensor,
        input_ids: Tensor,
        text_mask: Tensor,
        *,
        image_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """The three stage-1 losses on a batch of b pairs.

        image_embeds: (b, n, d_v) frozen vision tokens; input_ids / text_mask: (b, t) tokenized
        captions starting with [CLS]; image_ids: (b,) optional, pairs sharing an id are positives.
        Returns {"itc", "itm", "itg", "loss"} where loss is their sum, weighted by
        `loss_weights` (all 1 by default, as the original).
        """
        cfg = self.config
        if image_embeds.shape[0] != input_ids.shape[0] or input_ids.shape != text_mask.shape:
            raise ValueError(
                f"Batch mismatch: image_embeds {tuple(image_embeds.shape)}, input_ids "
                f"{tuple(input_ids.shape)}, text_mask {tuple(text_mask.shape)}; need one caption per image."
            )
        b, q = input_ids.shape[0], cfg.num_query_tokens
        qformer = self.qformer
        # texts are gathered across processes for ITM negatives: one length everywhere
        input_ids, text_mask = pad_text_to_world(input_ids, text_mask, cfg.pad_token_id)

        # step 1: trainable LayerNorm on the frozen tokens (fp32), and their cross-attention K/V,
        # computed once and shared by the query pass and the ITM pass
        image = self.vision_tokens(image_embeds)  # (b, n, d_v)
        image_kv = qformer.image_kv(image) if self.reuse_image_kv else None

        # step 2: query pass (image side of ITC), keeping its query keys/values for ITG
        query_pass = qformer(image_embeds=image, image_kv=image_kv, return_cache=self.reuse_query_cache)
        image_feats = F.normalize(self.vision_proj(query_pass.query_output), dim=-1)  # (b, q, e)

        # step 3: text pass (text side of ITC): no queries, no image
        text_feat = self.text_features(input_ids, text_mask)  # (b, e)

        # step 4: ITC
        itc = itc_loss(
            image_feats,
            text_feat,
            self.temp,
            image_ids=image_ids,
            label_smoothing=self.label_smoothing,
            gather_grad=self.itc_gather_grad,
        )

        # step 5: ITM on [positive pairs; (image, negative text); (negative image, text)], the
        # negatives drawn from the world batch and, with a negative pool, from earlier batches too
        pool = self.negative_pool if self.training else None
        if pool is not None and image_ids is None:
            raise ValueError("`itm_negative_pool` needs `image_ids`, to tell the pool's positives from its negatives.")
        sim_i2t, sim_t2i, pool_ids = itc.sim_i2t, itc.sim_t2i, None
        ids_all, mask_all = gather_no_grad(input_ids), gather_no_grad(text_mask)
        pos_ids, pos_mask = input_ids, text_mask
        if pool is not None and len(pool):
            with torch.no_grad():
                sim_i2t = torch.cat([sim_i2t.float(), self.itc_scores(image_feats.float(), pool.text_feats) / self.temp], 1)
                sim_t2i = torch.cat([sim_t2i.float(), self.itc_scores(pool.image_feats, text_feat.float()).t() / self.temp], 1)
            pool_ids = pool.image_ids
            length = max(ids_all.shape[1], pool.input_ids.shape[1])
            ids_all = torch.cat([_pad_right(ids_all, length, cfg.pad_token_id), _pad_right(pool.input_ids, length, cfg.pad_token_id)])
            mask_all = torch.cat([_pad_right(mask_all, length, 0), _pad_right(pool.text_mask, length, 0)])
            pos_ids, pos_mask = _pad_right(input_ids, length, cfg.pad_token_id), _pad_right(text_mask, length, 0)
        neg_text, neg_image = sample_itm_negatives(
            sim_i2t,
            sim_t2i,
            image_ids=image_ids,
            hardest=self.itm_negatives == "hardest",
            generator=generator,
            pool_ids=pool_ids,
        )
        itm_ids = torch.cat([pos_ids, pos_ids, ids_all[neg_text]], dim=0)  # (3b, t)
        itm_text_mask = torch.cat([pos_mask, pos_mask, mask_all[neg_text]], dim=0)
        itm_kv = self._itm_image_kv(image, image_kv, neg_image, pool.tokens if pool_ids is not None else None)
        itm_pass = qformer(
            input_ids=itm_ids,
            mask=masks.bidirectional_mask(q, itm_text_mask),
            image_kv=itm_kv,
            outputs="queries",  # the ITM head reads the queries only
        )
        itm_logits = self.itm_head(itm_pass.query_output).mean(dim=1)  # (3b, 2)
        itm = itm_loss(itm_logits, num_positives=b)

        # step 6: ITG: [DEC] replaces [CLS]; text sees all queries and earlier text
        dec_ids = input_ids.clone()
        dec_ids[:, 0] = cfg.dec_token_id
        labels = dec_ids.masked_fill(text_mask == 0, -100)
        if self.reuse_query_cache:
            itg_pass = qformer(
                input_ids=dec_ids,
                mask=masks.multimodal_causal_mask(q, text_mask, text_rows_only=True),
                use_queries=False,
                past_kv=query_pass.query_cache,
            )
        else:
            itg_pass = qformer(
                input_ids=dec_ids, mask=masks.multimodal_causal_mask(q, text_mask), image_embeds=image
            )
        lm_logits = self.lm_head(itg_pass.text_output, qformer.embeddings.word.weight)  # (b, t, V)
        itg = itg_loss(lm_logits, labels, label_smoothing=self.label_smoothing)

        if pool is not None:  # after drawing from it: an item is never its own pool negative
            pool.push(tokens=image_embeds, input_ids=input_ids, text_mask=text_mask, image_ids=image_ids,
                      image_feats=image_feats, text_feats=text_feat, pad_token_id=cfg.pad_token_id)  # fmt: skip
        w = self.loss_weights
        loss = w["itc"] * itc.loss + w["itm"] * itm + w["itg"] * itg
        return {"itc": itc.loss, "itm": itm, "itg": itg, "loss": loss}

    def _itm_image_kv(self, image: Tensor, image_kv: list[KV | None] | None, neg_image: Tensor,
                      pool_tokens: Tensor | None = None):  # fmt: skip
        """Cross-attention input for the ITM batch: images [pos; neg; pos] against texts [pos; pos; neg].
        `neg_image` indexes the world batch, then `pool_tokens` (frozen tokens of a negative pool)."""
        _, world = rank_and_world()
        if image_kv is not None and world == 1 and pool_tokens is None:
            # negatives are local images: reuse their keys/values
            neg_kv = [None if kv is None else (kv[0][neg_image], kv[1][neg_image]) for kv in image_kv]
        else:
            # negatives may live on other ranks (gather their tokens, with gradient) or in the pool
            images_all = gather_with_grad(image)
            neg = images_all[neg_image.clamp(max=images_all.shape[0] - 1)]
            if pool_tokens is not None:
                from_pool = neg_image >= images_all.shape[0]
                neg = neg.clone()
                neg[from_pool] = self.vision_tokens(pool_tokens[neg_image[from_pool] - images_all.shape[0]]).to(neg.dtype)
            if image_kv is None:  # no reuse: project the 3b images again
                return self.qformer.image_kv(torch.cat([image, neg, image], dim=0))
            neg_kv = self.qformer.image_kv(neg)
        return [
            None if kv is None else (torch.cat([kv[0], nk[0], kv[0]]), torch.cat([kv[1], nk[1], kv[1]]))
            for kv, nk in zip(image_kv, neg_kv)
        ]

    # ------------------------------------------------------------------ checkpoints
    KIND = "qformer-stage1"

    def options(self) -> dict:
        return {
            "itm_negatives": self.itm_negatives,
            "itc_gather_grad": self.itc_gather_grad,
            "label_smoothing": self.label_smoothing,
            "itm_negative_pool": self.itm_negative_pool,
            "loss_weights": self.loss_weights,
        }

    def save_pretrained(self, directory: str | Path, *, extra: dict | None = None) -> Path:
        """`config.json` (architecture, options, and `extra`: e.g. the vision tower's spec) and
        `model.safetensors` (all weights)."""
        config = {"kind": self.KIND, "qformer": self.config.to_dict(), "options": self.options(), **(extra or {})}
        return save_model(self, directory, config)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides) -> Stage1Model:
        config, state_dict = read_model_dir(directory)
        if config.get("kind") != cls.KIND:
            raise CheckpointError(
                f"{directory} is a {config.get('kind', 'unknown')!r} checkpoint, not a stage-1 one ({cls.KIND!r})."
            )
        model = cls(QFormerConfig.from_dict(config["qformer"]), **{**config.get("options", {}), **overrides})
        load_state_dict_strict(model, state_dict, source=str(directory))
        return model
