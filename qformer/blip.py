"""BLIP (Li et al., ICML 2022), the baseline recipe: a trained ViT and a multimodal mixture of
encoder-decoder (MED) over BERT, with its three pre-training objectives.

The text model is BERT with cross-attention to the image tokens in every layer, built from the
Q-Former's blocks (`qformer.model`), and used three ways:

* unimodal text encoder: [CLS] first, bidirectional self-attention, no cross-attention -> ITC;
* image-grounded text encoder: [ENC] replaces [CLS], cross-attention on every text token -> ITM;
* image-grounded text decoder: [DEC] replaces [CLS], causal self-attention -> LM.

Encoder and decoder share every parameter except the self-attention (BLIP's choice: the two tasks
differ most there); `share_encoder_decoder=False` gives the ablation with two separate models.
Shared modules are the same objects, so the optimizer sees each once; `state_dict()` lists each
tensor once, under the encoder's name, and loading fills the decoder's alias (see `_aliases`).

ITC follows ALBEF/BLIP: momentum (EMA) copies of the ViT, the text encoder and the projections
give features for a queue of earlier batches and soft targets for momentum distillation. ITM
mines one hard negative per item by ITC similarity. LM uses label smoothing 0.1, and a caption
prompt ("a picture of ") goes before every caption with its tokens left out of the loss.

Where we differ from the original code (each also noted at its place): the ViT's final LayerNorm
is ours (`vision_norm`, fresh), as the vision bridge drops the tower's own; ITM negatives are drawn
from the world batch (the original pre-training draws from the local one) by softmax of the online
features' similarity (no +1e-4 floor), never from pairs sharing an image id or the same caption;
beam search normalises scores by the generated length and keeps finished beams in the beam.

Legend: b local batch, B world batch, n image tokens, t text tokens, d text width, d_v vision
width, e embedding width (ITC), Q queue size, V vocabulary, k beams, L layers.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qformer import masks
from qformer.checkpoint import CheckpointError, LoadReport, load_state_dict_strict, read_model_dir, save_model
from qformer.config import BERT_BASE_VOCAB
from qformer.losses import (
    gather_no_grad,
    gather_with_grad,
    itg_loss,
    itm_loss,
    pad_text_to_world,
    sample_itm_negatives,
)
from qformer.model import ACTIVATIONS, KV, Attention, FeedForward, TextEmbeddings
from qformer.stage1 import LMHead

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from bridges.vision import VisionBridge

DEC_TOKEN, ENC_TOKEN = "[DEC]", "[ENC]"
Objective = Literal["itc", "itm", "lm"]
Use = Literal["retrieval", "itm", "caption", "train"]


# ==================================================================================== config
@dataclass
class BlipConfig:
    # --- the ViT, built through the vision bridge and trained (BLIP-2 freezes it; BLIP does not) ---
    vision_source: Literal["open_clip", "transformers"] = "open_clip"
    # open_clip model name (or a model-config JSON path) or transformers name/folder; None: unset
    vision_name: str | None = "ViT-B-16"
    # open_clip tag or weights file; None builds a random tower (building never downloads). The
    # original starts from ImageNet ViT-B/16 (DeiT) weights.
    vision_pretrained: str | None = None
    vision_layer: int = -1  # BLIP reads the last block (BLIP-2 the penultimate)
    vision_width: int = 768
    vision_layer_norm_eps: float = 1e-6  # the ViT's final LayerNorm
    # --- the text model (MED): bert-base-uncased with cross-attention in every layer ---
    num_layers: int = 12
    hidden_size: int = 768
    num_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: Literal["gelu", "gelu_new", "relu"] = "gelu"
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    # BERT's 30522 words plus [DEC] (decoder BOS) and [ENC] (ITM's first token), in that order
    vocab_size: int = BERT_BASE_VOCAB + 2
    max_position_embeddings: int = 512
    pad_token_id: int = 0
    dec_token_id: int = BERT_BASE_VOCAB
    enc_token_id: int = BERT_BASE_VOCAB + 1
    initializer_range: float = 0.02
    # Encoder and decoder share all but self-attention (the paper's choice); False: the ablation.
    share_encoder_decoder: bool = True
    # --- heads and objectives ---
    embed_dim: int = 256  # ITC projection width
    init_temp: float = 0.07
    temp_min: float = 0.001  # the temperature is clamped to [temp_min, temp_max] (BLIP-2 is not)
    temp_max: float = 0.5
    momentum: float = 0.995  # EMA of the momentum encoders
    queue_size: int = 57600  # must be a multiple of the world batch
    alpha: float = 0.4  # momentum distillation weight after the ramp (see `alpha_ramp`)
    label_smoothing: float = 0.1  # LM loss only; BLIP's ITC and ITM use none
    # weight of the match class in the ITM loss; 2.0 balances its one positive against two
    # negatives (see `losses.itm_loss`); BLIP: 1.0
    itm_positive_weight: float = 1.0
    # Put before every caption for the LM loss and generation, its tokens masked out of the loss
    # (BLIP's caption fine-tuning and CapFilt; its pre-training used none: set "" for that).
    prompt: str = "a picture of "
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("Invalid BlipConfig:\n  - " + "\n  - ".join(problems))

    def problems(self) -> list[str]:
        """Every problem with this config, not just the first one."""
        p: list[str] = []
        positive = [
            "vision_width", "num_layers", "hidden_size", "num_heads", "intermediate_size",
            "vocab_size", "max_position_embeddings", "embed_dim", "queue_size",
        ]  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                p.append(f"`{name}` must be a positive integer, got {value!r}")
        if not p and self.hidden_size % self.num_heads:
            p.append(f"`hidden_size` ({self.hidden_size}) must be divisible by `num_heads` ({self.num_heads})")
        if self.vision_source not in ("open_clip", "transformers"):
            p.append(f"`vision_source` must be 'open_clip' or 'transformers', got {self.vision_source!r}")
        if self.hidden_act not in ACTIVATIONS:
            p.append(f"`hidden_act` must be one of {', '.join(ACTIVATIONS)}, got {self.hidden_act!r}")
        for name in ("hidden_dropout", "attention_dropout", "label_smoothing", "momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                p.append(f"`{name}` must be in [0, 1), got {getattr(self, name)!r}")
        if not self.itm_positive_weight > 0:
            p.append(f"`itm_positive_weight` must be positive, got {self.itm_positive_weight!r}")
        if not 0.0 <= self.alpha <= 1.0:
            p.append(f"`alpha` must be in [0, 1], got {self.alpha!r}")
        if not 0 < self.temp_min <= self.init_temp <= self.temp_max:
            p.append(
                f"need 0 < temp_min <= init_temp <= temp_max, got {self.temp_min}, {self.init_temp}, {self.temp_max}"
            )
        ids = {n: getattr(self, n) for n in ("pad_token_id", "dec_token_id", "enc_token_id")}
        if isinstance(self.vocab_size, int):
            for name, value in ids.items():
                if not 0 <= value < self.vocab_size:
                    p.append(f"`{name}` ({value}) must be a token id below `vocab_size` ({self.vocab_size})")
        if len(set(ids.values())) < len(ids):
            p.append(f"pad, [DEC] and [ENC] need three different token ids, got {ids}")
        return p

    # --- (de)serialisation, presets ---
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlipConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown BlipConfig keys {unknown}; valid keys are {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> BlipConfig:
        if name not in BLIP_PRESETS:
            raise ValueError(f"Unknown BLIP preset {name!r}; choose one of {sorted(BLIP_PRESETS)}")
        return cls.from_dict({**BLIP_PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> BlipConfig:
        return dataclasses.replace(self, **changes)

    def with_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> BlipConfig:
        """This config with the vocabulary and special token ids of `tokenizer`
        (from `load_blip_tokenizer`)."""
        return self.replace(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            dec_token_id=tokenizer.convert_tokens_to_ids(DEC_TOKEN),
            enc_token_id=tokenizer.convert_tokens_to_ids(ENC_TOKEN),
        )

    @classmethod
    def from_bert(cls, name_or_path: str | Path, **overrides: Any) -> BlipConfig:
        """A config whose text model matches a BERT checkpoint (hub name or local folder; the
        original: bert-base-uncased) and its tokenizer with [DEC] and [ENC] added; `overrides`
        (e.g. the vision fields) apply last. Initialise the weights with `init_from_bert`."""
        from qformer.bert_init import read_bert_config

        bert = read_bert_config(name_or_path)
        tokenizer = load_blip_tokenizer(name_or_path)
        fields = dict(
            num_layers=bert.num_hidden_layers,
            hidden_size=bert.hidden_size,
            num_heads=bert.num_attention_heads,
            intermediate_size=bert.intermediate_size,
            hidden_act=bert.hidden_act,
            layer_norm_eps=bert.layer_norm_eps,
            hidden_dropout=bert.hidden_dropout_prob,
            attention_dropout=bert.attention_probs_dropout_prob,
            max_position_embeddings=bert.max_position_embeddings,
            initializer_range=bert.initializer_range,
        )
        meta = {"bert": str(name_or_path), **overrides.pop("meta", {})}
        config = cls.from_dict({**fields, **overrides, "meta": meta}).with_tokenizer(tokenizer)
        # some checkpoints pad their embedding table beyond the tokenizer: keep every BERT row
        return config.replace(vocab_size=max(config.vocab_size, bert.vocab_size))

    def vision_spec(self) -> dict[str, Any]:
        """The vision bridge's spec (`VisionBridge.from_spec`)."""
        return {
            "source": self.vision_source,
            "name": self.vision_name,
            "pretrained": self.vision_pretrained,
            "layer": self.vision_layer,
        }


BLIP_PRESETS: dict[str, dict[str, Any]] = {
    # BLIP as published: ViT-B/16 and bert-base-uncased (12 x 768, 12 heads, FFN 3072).
    "blip_base": {},
    # For tests and CPU smoke runs. No vision tower is named: set `vision_name` to a small open_clip
    # model config (a JSON file) with width 32, e.g. the ShapesWorld ViT or the tests' tiny one.
    "tiny": dict(
        vision_name=None, vision_width=32, num_layers=2, hidden_size=32, num_heads=4,
        intermediate_size=64, vocab_size=64, max_position_embeddings=40, dec_token_id=62,
        enc_token_id=63, embed_dim=16, queue_size=32,
    ),  # fmt: skip
}


def alpha_ramp(step: int, ramp_steps: int, final: float = 0.4) -> float:
    """Momentum-distillation weight at `step` (0-based): linear from 0 to `final` over the first
    `ramp_steps` steps, then `final`. BLIP ramps over the first epoch of pre-training (over two
    epochs in retrieval fine-tuning): pass `ramp_steps` = steps per epoch (times 2)."""
    if step < 0 or ramp_steps < 0:
        raise ValueError(f"`step` ({step}) and `ramp_steps` ({ramp_steps}) must be non-negative")
    if ramp_steps == 0:
        return final
    return final * min(1.0, step / ramp_steps)


def load_blip_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """A BERT tokenizer with [DEC] (the decoder's BOS, as for the Q-Former) and then [ENC] added:
    bert-base-uncased gives 30524 tokens, [DEC] = 30522 and [ENC] = 30523, as the original."""
    from qformer.bert_init import load_tokenizer

    tokenizer = load_tokenizer(name_or_path)
    # idempotent: a tokenizer saved after this call already holds [ENC] and keeps its id
    tokenizer.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
    return tokenizer


# ==================================================================================== losses
def itc_distill_loss(
    sim_i2t: Tensor,
    sim_t2i: Tensor,
    sim_i2t_m: Tensor,
    sim_t2i_m: Tensor,
    positives: Tensor,
    alpha: float,
) -> Tensor:
    """ITC with momentum distillation.

    sim_*: (b, b + Q) online similarities / temp, against [this batch's momentum features; queue].
    sim_*_m: the same rows from the momentum features (no gradient).
    positives: (b, b + Q) boolean, the pairs that match (the item itself, or the same image id).
    Targets: alpha * softmax(momentum similarities) + (1 - alpha) * positives spread evenly.
    """
    hard = positives.float()
    hard = hard / hard.sum(dim=1, keepdim=True)
    loss = 0.0
    for sim, sim_m in ((sim_i2t, sim_i2t_m), (sim_t2i, sim_t2i_m)):
        targets = alpha * sim_m.float().softmax(dim=1) + (1 - alpha) * hard
        loss = loss + -(sim.float().log_softmax(dim=1) * targets).sum(dim=1).mean()
    return loss / 2


class FeatureQueue(nn.Module):
    """A ring buffer of momentum features (image and text, normalised) and image ids of earlier
    batches, all under one pointer. Starts with random unit vectors and id -1 (never a positive)."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("image", F.normalize(torch.randn(size, dim), dim=1))  # (Q, e)
        self.register_buffer("text", F.normalize(torch.randn(size, dim), dim=1))  # (Q, e)
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))  # (Q,)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.image.shape[0]

    @torch.no_grad()
    def enqueue(self, image: Tensor, text: Tensor, ids: Tensor) -> None:
        """Write a (world) batch (B, e), (B, e), (B,) at the pointer and advance it by B."""
        B = image.shape[0]
        if self.size % B:
            raise ValueError(
                f"queue_size={self.size} is not a multiple of the world batch ({B} = batch per process "
                f"x processes): the queue would wrap in the middle of a batch. Pick a batch that divides "
                f"it, set `queue_size` to a multiple of {B}, or drop incomplete last batches (drop_last)."
            )
        p = int(self.ptr)
        self.image[p : p + B] = image.to(self.image.dtype)
        self.text[p : p + B] = text.to(self.text.dtype)
        self.ids[p : p + B] = ids
        self.ptr.fill_((p + B) % self.size)


# ==================================================================================== the MED
class MEDLayer(nn.Module):
    """A BERT layer with cross-attention to the image between self-attention and the FFN."""

    def __init__(self, config: BlipConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config, config.hidden_size)
        self.cross_attn = Attention(config, config.vision_width)
        self.ffn = FeedForward(config)

    def forward(
        self, x: Tensor, *, mask: Tensor | None, image_kv: KV | None, past_kv: KV | None = None
    ) -> tuple[Tensor, KV]:
        """x (b, t, d). Without `image_kv` the cross-attention is skipped (the unimodal encoder).
        Returns the output and the self-attention keys/values (the decoding cache)."""
        x, kv = self.self_attn(x, mask=mask, past_kv=past_kv)
        if image_kv is not None:
            x, _ = self.cross_attn(x, kv=image_kv)  # every text token attends to every image token
        return self.ffn(x), kv


class MED(nn.Module):
    """BERT embeddings and `MEDLayer`s: the text encoder, or (with its own self-attention) the decoder."""

    def __init__(self, config: BlipConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.layers = nn.ModuleList(MEDLayer(config) for _ in range(config.num_layers))

    def image_kv(self, image_embeds: Tensor) -> list[KV]:
        """Cross-attention keys/values of the image tokens (b, n, d_v), per layer."""
        return [layer.cross_attn.kv(image_embeds) for layer in self.layers]

    def forward(
        self,
        input_ids: Tensor,
        *,
        mask: Tensor | None,
        image_kv: list[KV] | None = None,
        past_kv: list[KV] | None = None,
    ) -> tuple[Tensor, list[KV]]:
        """input_ids (b, t); mask from `qformer.masks` (None: see everything). With `past_kv`
        (decoding) the text continues after the cached positions. Returns (b, t, d) and the cache."""
        offset = 0 if past_kv is None else past_kv[0][0].shape[2]
        if offset + input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"{offset + input_ids.shape[1]} text positions exceed max_position_embeddings="
                f"{self.config.max_position_embeddings}: truncate the text or generate fewer tokens."
            )
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise ValueError(
                f"Token ids must lie in [0, {self.config.vocab_size}) (vocab_size), got {int(input_ids.min())} "
                f"to {int(input_ids.max())}: is the tokenizer the one this model was built with?"
            )
        x = self.embeddings(input_ids, None, position_offset=offset)  # (b, t, d)
        cache = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(
                x,
                mask=mask,
                image_kv=None if image_kv is None else image_kv[i],
                past_kv=None if past_kv is None else past_kv[i],
            )
            cache.append(kv)
        return x, cache


# ==================================================================================== the model
# Every weight belongs to one part, by key prefix. A checkpoint may hold a subset of the parts.
PARTS: dict[str, tuple[str, ...]] = {
    "vision": ("vision.", "vision_norm."),
    "text": ("text_encoder.",),
    "itc": ("vision_proj.", "text_proj.", "temp"),
    "itm": ("itm_head.",),
    "decoder": ("text_decoder.", "lm_head."),  # with sharing: the decoder's self-attention only
    "momentum": ("vision_m.", "vision_norm_m.", "text_encoder_m.", "vision_proj_m.", "text_proj_m.", "queue."),
}


def part_of(key: str) -> str:
    for part, prefixes in PARTS.items():
        if any(key == p or key.startswith(p) for p in prefixes):
            return part
    raise KeyError(f"{key} belongs to no part of BlipModel.PARTS")


class BlipModel(nn.Module):
    KIND = "blip"

    def __init__(
        self,
        config: BlipConfig,
        tokenizer: PreTrainedTokenizerBase,
        *,
        vision: VisionBridge | None = None,
        device: str | torch.device | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        """`tokenizer`: from `load_blip_tokenizer` (it must hold [DEC] and [ENC] at the config's
        ids). `vision`: a trainable bridge; None builds one from the config's `vision_*` fields
        (on `device`, computing in `compute_dtype`)."""
        super().__init__()
        _check_tokenizer(tokenizer, config)
        self.config = config
        self.tokenizer = tokenizer  # a plain attribute: not a module, not in the state dict
        self.eos_token_id: int = tokenizer.sep_token_id  # BERT ends a text with [SEP]
        self.missing_parts: set[str] = set()  # parts a checkpoint did not provide (left fresh)
        d, e = config.hidden_size, config.embed_dim

        # the ViT (trained) and its final LayerNorm, ours: the bridge drops the tower's own
        self.vision = vision if vision is not None else build_vision(config, device=device, compute_dtype=compute_dtype)
        _check_vision(self.vision, config)
        self.vision_norm = nn.LayerNorm(config.vision_width, eps=config.vision_layer_norm_eps)

        # the MED: one encoder; the decoder shares all of it but the self-attention
        self.text_encoder = MED(config)
        self.text_decoder = MED(config)
        if config.share_encoder_decoder:
            self.text_decoder.embeddings = self.text_encoder.embeddings
            for enc, dec in zip(self.text_encoder.layers, self.text_decoder.layers):
                dec.cross_attn, dec.ffn = enc.cross_attn, enc.ffn

        # heads; the LM head's output matrix is the decoder's word embeddings (tied)
        self.vision_proj = nn.Linear(config.vision_width, e)
        self.text_proj = nn.Linear(d, e)
        self.itm_head = nn.Linear(d, 2)
        self.lm_head = LMHead(config)
        self.temp = nn.Parameter(torch.tensor(config.init_temp))
        self._init_text_and_heads()

        # momentum encoders (EMA copies, never trained by gradients) and the feature queue
        self.vision_m = copy.deepcopy(self.vision)
        self.vision_norm_m = copy.deepcopy(self.vision_norm)
        self.text_encoder_m = copy.deepcopy(self.text_encoder)
        self.vision_proj_m = copy.deepcopy(self.vision_proj)
        self.text_proj_m = copy.deepcopy(self.text_proj)
        for p in self.momentum_parameters():
            p.requires_grad_(False)
        self.queue = FeatureQueue(config.queue_size, e)
        self.register_buffer("prompt_ids", self._encode_prompt(config.prompt), persistent=False)  # (P,)
        if device is not None:
            self.to(device)

        # state_dict() without the decoder's aliases of shared tensors; loading fills them in
        self._aliases = _aliases(self)
        self.register_state_dict_post_hook(_drop_aliases)
        self.register_load_state_dict_pre_hook(_fill_aliases)

    @torch.no_grad()
    def _init_text_and_heads(self) -> None:
        """BERT's initialisation for the MED and the heads (the ViT keeps its own)."""
        std = self.config.initializer_range
        heads = (self.vision_proj, self.text_proj, self.itm_head, self.lm_head)
        for module in (self.text_encoder, self.text_decoder, *heads):
            for m in module.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=std)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
                if isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
        for med in (self.text_encoder, self.text_decoder):
            med.embeddings.word.weight[self.config.pad_token_id].zero_()

    def _encode_prompt(self, prompt: str) -> Tensor:
        return torch.tensor(self.tokenizer(prompt, add_special_tokens=False)["input_ids"], dtype=torch.long)

    # ------------------------------------------------------------------ momentum
    def _momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [
            (self.vision, self.vision_m),
            (self.vision_norm, self.vision_norm_m),
            (self.text_encoder, self.text_encoder_m),
            (self.vision_proj, self.vision_proj_m),
            (self.text_proj, self.text_proj_m),
        ]

    def momentum_parameters(self) -> list[nn.Parameter]:
        return [p for _, m in self._momentum_pairs() for p in m.parameters()]

    @torch.no_grad()
    def momentum_update(self) -> None:
        """p_m = momentum * p_m + (1 - momentum) * p, for every momentum parameter."""
        m = self.config.momentum
        for online, ema in self._momentum_pairs():
            for p, p_m in zip(online.parameters(), ema.parameters(), strict=True):
                p_m.mul_(m).add_(p.detach(), alpha=1 - m)

    @torch.no_grad()
    def reset_momentum(self) -> None:
        """Momentum encoders := the online ones, and a fresh random queue (e.g. to fine-tune from
        a checkpoint saved without its momentum part)."""
        for online, ema in self._momentum_pairs():
            for p, p_m in zip(online.parameters(), ema.parameters(), strict=True):
                p_m.copy_(p)
        fresh = FeatureQueue(self.queue.size, self.config.embed_dim)
        self.queue.load_state_dict(fresh.state_dict())
        self.missing_parts.discard("momentum")

    # ------------------------------------------------------------------ inference
    def embed_image(self, pixel_values: Tensor) -> Tensor:
        """Pixels (b, 3, S, S) -> the ViT's tokens after its final norm (b, n, d_v), [CLS] first.
        These are the `image_embeds` that `encode_image` and `itm_logits` take."""
        return self.vision_norm(self.vision(pixel_values).float())

    def encode_image(self, image_embeds: Tensor) -> tuple[Tensor, Tensor]:
        """Image embeds (b, n, d_v) -> the [CLS] token (b, d_v) and its normalised ITC feature (b, e)."""
        self._require("retrieval")
        return self._encode_image(image_embeds)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Text (b, t) starting with [CLS] -> hidden states (b, t, d) and the normalised ITC feature
        of [CLS] (b, e). The unimodal encoder: no cross-attention."""
        self._require("retrieval")
        return self._encode_text(input_ids, attention_mask)

    def text_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The normalised ITC feature of each text's [CLS] (b, e), as `Stage1Model.text_features`."""
        return self.encode_text(input_ids, attention_mask)[1]

    def _encode_image(self, image_embeds: Tensor) -> tuple[Tensor, Tensor]:
        cls = image_embeds[:, 0]  # (b, d_v)
        return cls, F.normalize(self.vision_proj(cls), dim=-1)

    def _encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        hidden, _ = self.text_encoder(input_ids, mask=masks.text_only_mask(attention_mask))
        return hidden, F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def itc_scores(self, image_feats: Tensor, text_feats: Tensor) -> Tensor:
        """Cosine similarity of every image (I, e) with every text (T, e): (I, T)."""
        return image_feats @ text_feats.T

    def itm_logits(self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """ITM logits (b, 2) of the pairs (image_embeds[i], text[i]); [ENC] replaces [CLS]."""
        self._require("itm")
        return self._itm_logits(image_embeds, input_ids, attention_mask)

    def _itm_logits(self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        enc_ids = input_ids.clone()
        enc_ids[:, 0] = self.config.enc_token_id
        image_kv = self.text_encoder.image_kv(image_embeds)
        hidden, _ = self.text_encoder(enc_ids, mask=masks.text_only_mask(attention_mask), image_kv=image_kv)
        return self.itm_head(hidden[:, 0])

    @torch.no_grad()
    def itm_score(self, pixel_values: Tensor, texts: Sequence[str], *, max_length: int = 35) -> Tensor:
        """Probability (b,) that texts[i] describes image i (CapFilt keeps pairs scoring >= 0.5).
        Runs in the model's current mode: call `.eval()` first."""
        self._require("itm")
        if len(texts) != pixel_values.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} images but {len(texts)} texts: need one text per image.")
        input_ids, attention_mask = self.tokenize(texts, max_length=max_length)
        logits = self.itm_logits(self.embed_image(pixel_values), input_ids, attention_mask)
        return logits.float().softmax(dim=-1)[:, 1]

    def tokenize(self, texts: Sequence[str], *, max_length: int = 35) -> tuple[Tensor, Tensor]:
        """Texts -> (input_ids, attention_mask) (b, t) on the model's device, [CLS] first, right-padded."""
        out = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=max_length,
            padding_side="right", return_tensors="pt",
        )  # fmt: skip
        device = self.temp.device
        return out["input_ids"].to(device), out["attention_mask"].to(device)

    # ------------------------------------------------------------------ training
    def forward(
        self,
        pixel_values: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        image_ids: Tensor | None = None,
        alpha: float | None = None,
        objectives: Sequence[Objective] = ("itc", "itm", "lm"),
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """BLIP's losses on a batch of b (image, caption) pairs.

        pixel_values (b, 3, S, S); input_ids / attention_mask (b, t): captions tokenized with
        [CLS] first (no prompt: the LM objective adds it); image_ids (b,) optional, non-negative:
        pairs sharing an id are positives for ITC and never ITM negatives; alpha: the distillation
        weight (`alpha_ramp`; None: the config's final value); objectives: e.g. ("lm",) for
        caption fine-tuning, ("itc", "itm") for retrieval. In train mode, each call first updates
        the momentum encoders and finally enqueues the batch's momentum features.
        Returns {objective: loss} and "loss", their (equally weighted) sum.
        """
        cfg = self.config
        objectives = tuple(objectives)
        self._check_batch(pixel_values, input_ids, attention_mask, image_ids, objectives, alpha)
        alpha = cfg.alpha if alpha is None else alpha
        b = input_ids.shape[0]
        losses: dict[str, Tensor] = {}

        # step 1: the ViT, with gradient
        image = self.embed_image(pixel_values)  # (b, n, d_v)

        if "itc" in objectives or "itm" in objectives:
            # step 2: unimodal features: image [CLS] and text [CLS], projected and normalised
            with torch.no_grad():
                self.temp.clamp_(cfg.temp_min, cfg.temp_max)
            _, image_feat = self._encode_image(image)  # (b, e)
            _, text_feat = self._encode_text(input_ids, attention_mask)  # (b, e)

        if "itc" in objectives:
            # step 3: ITC against [momentum features; queue], with momentum distillation
            losses["itc"] = self._itc(image_feat, text_feat, pixel_values, input_ids, attention_mask, image_ids, alpha)

        if "itm" in objectives:
            # step 4: ITM on [positive pairs; (negative image, text); (image, negative text)]
            ids, text_mask = pad_text_to_world(input_ids, attention_mask, cfg.pad_token_id)
            neg_text, neg_image = self.hard_negatives(
                image_feat, text_feat, image_ids=image_ids, input_ids=ids, generator=generator
            )
            images_all = gather_with_grad(image)  # (B, n, d_v); other ranks' get this rank's gradient
            ids_all, mask_all = gather_no_grad(ids), gather_no_grad(text_mask)
            itm_images = torch.cat([image, images_all[neg_image], image])  # (3b, n, d_v)
            itm_ids = torch.cat([ids, ids, ids_all[neg_text]])  # (3b, t)
            itm_mask = torch.cat([text_mask, text_mask, mask_all[neg_text]])
            losses["itm"] = itm_loss(self._itm_logits(itm_images, itm_ids, itm_mask), num_positives=b,
                                     positive_weight=cfg.itm_positive_weight)  # fmt: skip

        if "lm" in objectives:
            # step 5: LM: [DEC] prompt caption, causal, cross-attending to the image
            dec_ids, dec_mask, labels = self.decoder_inputs(input_ids, attention_mask)
            hidden, _ = self.text_decoder(
                dec_ids,
                mask=masks.multimodal_causal_mask(0, dec_mask),  # no queries: causal + padding
                image_kv=self.text_decoder.image_kv(image),
            )
            logits = self.lm_head(hidden, self.text_decoder.embeddings.word.weight)  # (b, t', V)
            losses["lm"] = itg_loss(logits, labels, label_smoothing=cfg.label_smoothing)

        losses["loss"] = sum(losses.values())
        return losses

    def _check_batch(
        self,
        pixel_values: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        image_ids: Tensor | None,
        objectives: tuple[str, ...],
        alpha: float | None,
    ) -> None:
        problems = []
        unknown = sorted(set(objectives) - {"itc", "itm", "lm"})
        if unknown or not objectives:
            problems.append(f"objectives={objectives}: choose one or more of 'itc', 'itm', 'lm'")
        b = pixel_values.shape[0]
        if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape or input_ids.shape[0] != b:
            problems.append(
                f"pixel_values {tuple(pixel_values.shape)}, input_ids {tuple(input_ids.shape)} and "
                f"attention_mask {tuple(attention_mask.shape)}: need one caption (b, t) per image"
            )
        if image_ids is not None and (image_ids.shape != (b,) or bool((image_ids < 0).any())):
            problems.append(f"image_ids must be (b,) = ({b},) non-negative ids, got {tuple(image_ids.shape)}")
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            problems.append(f"alpha={alpha} must be in [0, 1] (see `alpha_ramp`)")
        if problems:
            raise ValueError("Bad BLIP batch:\n  - " + "\n  - ".join(problems))

    def _itc(
        self,
        image_feat: Tensor,
        text_feat: Tensor,
        pixel_values: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        image_ids: Tensor | None,
        alpha: float,
    ) -> Tensor:
        b = image_feat.shape[0]
        temp = self.temp.float()
        with torch.no_grad():
            if self.training:
                self.momentum_update()
            image_m = self.vision_norm_m(self.vision_m(pixel_values).float())
            image_feat_m = F.normalize(self.vision_proj_m(image_m[:, 0]), dim=-1)  # (b, e)
            text_m, _ = self.text_encoder_m(input_ids, mask=masks.text_only_mask(attention_mask))
            text_feat_m = F.normalize(self.text_proj_m(text_m[:, 0]), dim=-1)  # (b, e)
            # this batch's momentum features, then the queue (as the original: other ranks'
            # features of this step join through the queue only, from the next step on)
            image_all = torch.cat([image_feat_m, self.queue.image]).float()  # (b + Q, e)
            text_all = torch.cat([text_feat_m, self.queue.text]).float()
            sim_i2t_m = image_feat_m.float() @ text_all.T / temp  # (b, b + Q)
            sim_t2i_m = text_feat_m.float() @ image_all.T / temp
            if image_ids is None:
                positives = torch.zeros_like(sim_i2t_m, dtype=torch.bool)
                positives[:, :b] = torch.eye(b, dtype=torch.bool, device=positives.device)
            else:
                ids_all = torch.cat([image_ids, self.queue.ids])  # (b + Q,)
                positives = image_ids[:, None] == ids_all[None, :]
        sim_i2t = image_feat.float() @ text_all.T / temp  # (b, b + Q)
        sim_t2i = text_feat.float() @ image_all.T / temp
        loss = itc_distill_loss(sim_i2t, sim_t2i, sim_i2t_m, sim_t2i_m, positives, alpha)
        if self.training:
            ids = image_ids if image_ids is not None else torch.full((b,), -1, device=image_feat.device)
            self.queue.enqueue(gather_no_grad(image_feat_m), gather_no_grad(text_feat_m), gather_no_grad(ids))
        return loss

    @torch.no_grad()
    def hard_negatives(
        self,
        image_feat: Tensor,
        text_feat: Tensor,
        *,
        image_ids: Tensor | None = None,
        input_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One negative text per image and one negative image per text, drawn from the world batch
        in proportion to softmax(ITC similarity). Never drawn: the item itself, items sharing its
        image id, and, given `input_ids` (b, t) (padded alike on every process), items whose
        caption is the same text (a false negative for either side of the pair).
        Returns (neg_text_for_image, neg_image_for_text), (b,) world indices."""
        temp = self.temp.float()
        sim_i2t = image_feat.float() @ gather_no_grad(text_feat).float().T / temp  # (b, B)
        sim_t2i = text_feat.float() @ gather_no_grad(image_feat).float().T / temp
        same_text = None
        if input_ids is not None:
            same_text = (input_ids[:, None, :] == gather_no_grad(input_ids)[None, :, :]).all(dim=-1)  # (b, B)
        return sample_itm_negatives(sim_i2t, sim_t2i, image_ids=image_ids, exclude=same_text, generator=generator)

    def decoder_inputs(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Captions [CLS] w1 .. [SEP] -> decoder input [DEC] prompt w1 .. [SEP] (b, 1 + P + t - 1),
        its mask, and LM labels: -100 on [DEC], the prompt and padding (the prompt is given, not
        learned)."""
        b = input_ids.shape[0]
        prompt = self.prompt_ids.to(input_ids.device).expand(b, -1)  # (b, P)
        dec = torch.full((b, 1), self.config.dec_token_id, dtype=input_ids.dtype, device=input_ids.device)
        dec_ids = torch.cat([dec, prompt, input_ids[:, 1:]], dim=1)
        dec_mask = torch.cat([torch.ones_like(dec), torch.ones_like(prompt), attention_mask[:, 1:]], dim=1)
        labels = dec_ids.masked_fill(dec_mask == 0, -100)
        labels[:, : 1 + prompt.shape[1]] = -100
        return dec_ids, dec_mask, labels

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        pixel_values: Tensor,
        *,
        num_beams: int = 3,
        top_p: float | None = None,
        max_new_tokens: int = 20,
        min_new_tokens: int = 5,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
        prompt: str | None = None,
        generator: torch.Generator | None = None,
    ) -> list[str]:
        """Captions for a batch of images, without the prompt. Beam search (BLIP: 3 beams), or
        nucleus sampling with `top_p` (CapFilt: 0.9, with num_beams=1; BLIP samples with
        repetition_penalty 1.1). `prompt`: default the config's. Runs in the model's current mode:
        call `.eval()` first."""
        self._require("caption")
        problems = []
        if num_beams < 1:
            problems.append(f"num_beams={num_beams} must be at least 1")
        if top_p is not None and not (0 < top_p <= 1 and num_beams == 1):
            problems.append(
                f"top_p={top_p} with num_beams={num_beams}: nucleus sampling needs 0 < top_p <= 1 and "
                "num_beams=1; leave top_p unset for beam search"
            )
        if not 0 <= min_new_tokens <= max_new_tokens or max_new_tokens < 1:
            problems.append(
                f"need 0 <= min_new_tokens ({min_new_tokens}) <= max_new_tokens ({max_new_tokens}) and max >= 1"
            )
        if repetition_penalty <= 0:
            problems.append(f"repetition_penalty={repetition_penalty} must be > 0")
        if problems:
            raise ValueError("Bad generation settings:\n  - " + "\n  - ".join(problems))

        image = self.embed_image(pixel_values)  # (b, n, d_v)
        b, k = image.shape[0], num_beams
        prompt_ids = self.prompt_ids if prompt is None else self._encode_prompt(prompt)
        start = torch.cat([torch.tensor([self.config.dec_token_id]), prompt_ids.cpu()]).to(image.device)
        seqs = start.expand(b * k, -1).clone()  # (b k, 1 + P)
        image_kv = self.text_decoder.image_kv(image.repeat_interleave(k, dim=0))
        logits, cache = self._decode_step(seqs, image_kv, None)
        scores = torch.zeros(b, k, device=image.device)
        scores[:, 1:] = float("-inf")  # all beams start equal: keep one until the first step
        scores = scores.view(-1)  # (b k,)
        done = torch.zeros(b * k, dtype=torch.bool, device=image.device)
        pad, eos = self.config.pad_token_id, self.eos_token_id

        for step in range(max_new_tokens):
            logits = _penalise_repeats(logits.float(), seqs, repetition_penalty)
            if step < min_new_tokens:
                logits[:, eos] = float("-inf")
            logp = logits.log_softmax(dim=-1)  # (b k, V)
            # a finished sequence continues with padding at no cost
            logp[done] = float("-inf")
            logp[done, pad] = 0.0
            if top_p is not None:
                token = _nucleus_sample(logp, top_p, generator)  # (b,)
                origin = torch.arange(b, device=image.device)
                scores = scores + logp.gather(1, token[:, None]).squeeze(1)
            else:
                V = logp.shape[1]
                top, idx = (scores[:, None] + logp).view(b, k * V).topk(k, dim=1)  # (b, k)
                origin = (torch.arange(b, device=image.device)[:, None] * k + idx // V).view(-1)
                token, scores = (idx % V).view(-1), top.view(-1)
            seqs = torch.cat([seqs[origin], token[:, None]], dim=1)
            done = done[origin] | (token == eos)
            cache = [(key[origin], value[origin]) for key, value in cache]
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            logits, cache = self._decode_step(token[:, None], image_kv, cache)

        new = seqs[:, start.shape[0] :]  # (b k, generated)
        lengths = (new != pad).sum(dim=1).clamp(min=1).float()
        best = (scores / lengths**length_penalty).view(b, k).argmax(dim=1)
        chosen = new.view(b, k, -1)[torch.arange(b), best]
        captions = []
        for row in chosen.tolist():
            row = row[: row.index(eos)] if eos in row else row
            captions.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return captions

    def _decode_step(self, ids: Tensor, image_kv: list[KV], cache: list[KV] | None) -> tuple[Tensor, list[KV]]:
        """Logits (b, V) of the next token after `ids` (b, t), given the cache of earlier tokens."""
        t = ids.shape[1]
        mask = None if t == 1 else torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
        hidden, cache = self.text_decoder(ids, mask=mask, image_kv=image_kv, past_kv=cache)
        return self.lm_head(hidden[:, -1], self.text_decoder.embeddings.word.weight), cache

    # ------------------------------------------------------------------ parts and checkpoints
    def parts_needed(self, use: Use) -> tuple[str, ...]:
        """The parts that `use` reads: "retrieval" (encode_image/encode_text), "itm" (itm_logits,
        itm_score), "caption" (generate), "train" (every objective)."""
        needs = {
            "retrieval": ("vision", "text", "itc"),
            "itm": ("vision", "text", "itm"),
            # with sharing, the decoder runs on the encoder's embeddings, cross-attention and FFNs
            "caption": ("vision", "text", "decoder") if self.config.share_encoder_decoder else ("vision", "decoder"),
            "train": ("vision", "text", "itc", "itm", "decoder"),
        }
        if use not in needs:
            raise ValueError(f"Unknown use {use!r}; choose one of {sorted(needs)}")
        return needs[use]

    def _require(self, use: Use) -> None:
        missing = [p for p in self.parts_needed(use) if p in self.missing_parts]
        if missing:
            raise CheckpointError(
                f"This BlipModel was loaded without its {missing} part(s) ({_describe(missing)}), which "
                f"{use!r} needs: they are random. Load a checkpoint that holds them, e.g. "
                f"BlipModel.from_pretrained(DIR, need={use!r}) to check one."
            )

    def save_pretrained(
        self, directory: str | Path, *, parts: Sequence[str] | None = None, extra: dict | None = None
    ) -> Path:
        """`config.json` (kind "blip", the BlipConfig, the parts saved, the ViT's preprocessing,
        and `extra`), `model.safetensors` with the weights of `parts` (default: every part this
        model has; leave out "momentum" for a checkpoint that only serves inference) and the
        tokenizer under `tokenizer/`."""
        parts = [p for p in PARTS if p not in self.missing_parts] if parts is None else list(parts)
        unknown = sorted(set(parts) - set(PARTS))
        if unknown:
            raise ValueError(f"Unknown parts {unknown}; choose from {list(PARTS)}")
        absent = sorted(set(parts) & self.missing_parts)
        if absent:
            raise ValueError(f"Cannot save parts {absent}: this model was loaded without them.")
        config = {
            "kind": self.KIND,
            "blip": self.config.to_dict(),
            "parts": [p for p in PARTS if p in parts],
            "vision_preprocess": {
                "image_size": self.vision.image_size,
                "mean": list(self.vision.mean),
                "std": list(self.vision.std),
            },
            **(extra or {}),
        }
        tensors = {k: v for k, v in self.state_dict().items() if part_of(k) in parts}
        directory = save_model(tensors, directory, config)
        self.tokenizer.save_pretrained(Path(directory) / "tokenizer")
        return directory

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        need: Use | Sequence[Use] | None = None,
        device: str | torch.device | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> BlipModel:
        """A model from `save_pretrained`'s directory. `need`: what it will be used for ("itm",
        "caption", "retrieval", "train"); a checkpoint lacking a part that this needs fails here,
        naming the part. Parts the checkpoint lacks stay fresh and are listed in `missing_parts`
        (inference methods refuse to use them); a missing momentum part is copied from the online
        model."""
        from transformers import AutoTokenizer

        from bridges.vision import VisionBridge

        saved, state_dict = read_model_dir(directory)
        if saved.get("kind") != cls.KIND:
            raise CheckpointError(
                f"{directory} is a {saved.get('kind', 'unknown')!r} checkpoint, not a BLIP one ({cls.KIND!r})."
            )
        config = BlipConfig.from_dict(saved["blip"])
        has = set(saved.get("parts", PARTS))
        tokenizer = AutoTokenizer.from_pretrained(Path(directory) / "tokenizer")
        # open_clip towers are built empty (the trained weights are ours) with the preprocessing
        # saved; transformers towers only build from their folder, whose weights we then replace
        spec = config.vision_spec()
        if config.vision_source == "open_clip":
            spec["pretrained"] = None
        vision = VisionBridge.from_spec(spec, device=device, compute_dtype=compute_dtype, trainable=True)
        if config.vision_source == "open_clip" and "vision_preprocess" in saved:
            pre = saved["vision_preprocess"]
            vision.image_size, vision.mean, vision.std = pre["image_size"], tuple(pre["mean"]), tuple(pre["std"])
        model = cls(config, tokenizer, vision=vision, device=device)

        needs = [need] if isinstance(need, str) else list(need or [])
        lacking = sorted({p for use in needs for p in model.parts_needed(use)} - has, key=list(PARTS).index)
        if lacking:
            raise CheckpointError(
                f"{directory} has no {lacking} part ({_describe(lacking)}), which {needs} needs: it was "
                f"saved with parts {sorted(has, key=list(PARTS).index)}. Use a checkpoint trained and saved "
                f"with those parts (e.g. an ITM filter needs a model fine-tuned with ITC/ITM)."
            )
        own = {k: v for k, v in model.state_dict().items() if part_of(k) in has}
        load_state_dict_strict(own, state_dict, source=str(directory))
        model.missing_parts = set(PARTS) - has
        if "momentum" in model.missing_parts:
            model.reset_momentum()
        return model


def init_from_bert(model: BlipModel, name_or_path: str | Path) -> LoadReport:
    """Copy a BERT checkpoint into the text model, in place, as the original starts BLIP: the
    encoder's embeddings, self-attention and FFNs, the decoder's self-attention (and, without
    sharing, its own embeddings and FFNs) all from BERT's layers, and the LM head from a masked-LM
    checkpoint's head. Cross-attention, the ITC/ITM heads and the ViT stay as they are; the
    momentum encoders are then copied from the online ones. `model` must be built from
    `BlipConfig.from_bert(name_or_path, ...)`. Returns the report (`skipped`: BERT's unused weights)."""
    # BERT's names, the unused-weight reasons and the vocabulary/token-type handling of the
    # Q-Former's initialisation serve the MED unchanged
    from qformer.bert_init import (
        _FFN,
        _LM_HEAD,
        _SELF_ATTENTION,
        _UNUSED,
        _mapped_tensors,
        read_bert_config,
        read_bert_weights,
    )

    name, cfg = str(name_or_path), model.config
    bert_config = read_bert_config(name)
    fields = [
        ("num_layers", "num_hidden_layers"), ("num_heads", "num_attention_heads"), ("hidden_size", "hidden_size"),
        ("intermediate_size", "intermediate_size"), ("hidden_act", "hidden_act"), ("layer_norm_eps", "layer_norm_eps"),
    ]  # fmt: skip
    problems = [
        f"`{ours}` is {getattr(cfg, ours)!r}, the checkpoint's {theirs} is {getattr(bert_config, theirs)!r}"
        for ours, theirs in fields
        if getattr(cfg, ours) != getattr(bert_config, theirs)
    ]
    if problems:
        raise CheckpointError(
            f"The BlipConfig does not match BERT {name!r}:\n  - " + "\n  - ".join(problems)
            + f"\nBuild the config with `BlipConfig.from_bert({name!r}, ...)`."
        )
    bert = read_bert_weights(name)

    def med_pairs(prefix: str, blocks: dict[str, str], embeddings: bool) -> dict[str, str]:
        pairs = {}
        if embeddings:
            for ours, theirs in (("word", "word_embeddings"), ("position", "position_embeddings")):
                pairs[f"{prefix}embeddings.{ours}.weight"] = f"embeddings.{theirs}.weight"
            for p in ("weight", "bias"):
                pairs[f"{prefix}embeddings.norm.{p}"] = f"embeddings.LayerNorm.{p}"
        for i in range(cfg.num_layers):
            for ours, theirs in blocks.items():
                for p in ("weight", "bias"):
                    pairs[f"{prefix}layers.{i}.{ours}.{p}"] = f"encoder.layer.{i}.{theirs}.{p}"
        return pairs

    layer_blocks = {**_SELF_ATTENTION, **{f"ffn.{k}": v for k, v in _FFN.items()}}
    encoder = med_pairs("text_encoder.", layer_blocks, embeddings=True)
    lm_head_from_bert = "cls.predictions.bias" in bert
    if lm_head_from_bert:
        for ours, theirs in _LM_HEAD.items():
            for p in ("weight", "bias"):
                encoder[f"lm_head.{ours}.{p}"] = f"{theirs}.{p}"
        encoder["lm_head.bias"] = "cls.predictions.bias"
    if cfg.share_encoder_decoder:  # only the decoder's self-attention is its own
        encoder.update(med_pairs("text_decoder.", _SELF_ATTENTION, embeddings=False))
        decoder = {}
    else:
        decoder = med_pairs("text_decoder.", layer_blocks, embeddings=True)
    tensors = _mapped_tensors(model, bert, encoder, name, "text_encoder.")
    if decoder:
        tensors.update(_mapped_tensors(model, bert, decoder, name, "text_decoder."))

    fresh = ("vision.", "vision_norm.", "vision_proj.", "text_proj.", "itm_head.", "temp", *PARTS["momentum"])
    for med in ("text_encoder", "text_decoder"):
        fresh += tuple(f"{med}.layers.{i}.cross_attn." for i in range(cfg.num_layers))
    fresh += () if lm_head_from_bert else ("lm_head.",)
    report = load_state_dict_strict(model, tensors, allow_missing=fresh, source=f"BERT {name!r}")
    model.reset_momentum()

    used = {*encoder.values(), *decoder.values(), "embeddings.token_type_embeddings.weight"}
    for key in sorted(set(bert) - used):
        report.skipped[key] = next(reason for part, reason in _UNUSED if part in key)
    return report


# ==================================================================================== helpers
def build_vision(
    config: BlipConfig, *, device: str | torch.device | None = None, compute_dtype: torch.dtype | None = None
) -> VisionBridge:
    """The trainable ViT named by the config's `vision_*` fields."""
    from bridges.vision import VisionBridge

    if not config.vision_name:
        raise ValueError(
            "BlipConfig.vision_name is not set: name the ViT (an open_clip model or model-config JSON, "
            "or a transformers model), e.g. vision_name='ViT-B-16'."
        )
    return VisionBridge.from_spec(config.vision_spec(), device=device, compute_dtype=compute_dtype, trainable=True)


def _check_vision(vision: VisionBridge, config: BlipConfig) -> None:
    problems = []
    if not getattr(vision, "trainable", False):
        problems.append("the bridge is frozen: BLIP trains its ViT; build it with trainable=True")
    if vision.width != config.vision_width:
        problems.append(
            f"its tokens are {vision.width} wide, the config's vision_width is {config.vision_width}: "
            f"set vision_width={vision.width}"
        )
    if problems:
        raise ValueError("The vision tower cannot serve this BlipModel:\n  - " + "\n  - ".join(problems))


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase, config: BlipConfig) -> None:
    problems = []
    found = {
        "pad_token_id": tokenizer.pad_token_id,
        "dec_token_id": tokenizer.convert_tokens_to_ids(DEC_TOKEN),
        "enc_token_id": tokenizer.convert_tokens_to_ids(ENC_TOKEN),
    }
    for name, value in found.items():
        if value != getattr(config, name):
            problems.append(f"the tokenizer gives {name}={value}, the config {getattr(config, name)}")
    if len(tokenizer) > config.vocab_size:
        problems.append(f"the tokenizer has {len(tokenizer)} tokens, more than vocab_size={config.vocab_size}")
    if tokenizer.sep_token_id is None:
        problems.append("the tokenizer has no [SEP] token, which ends captions (the decoder's EOS)")
    if problems:
        raise ValueError(
            "Tokenizer and BlipConfig disagree:\n  - " + "\n  - ".join(problems)
            + "\nLoad the tokenizer with `load_blip_tokenizer` and build the config with "
            "`config.with_tokenizer(tokenizer)`."
        )


def _describe(parts: Sequence[str]) -> str:
    return "; ".join(f"{p}: {', '.join(k + '*' if k.endswith('.') else k for k in PARTS[p])}" for p in parts)


def _aliases(model: nn.Module) -> dict[str, str]:
    """Alias key -> the key it shares its tensor with (the first name registered: the encoder's)."""
    first: dict[int, str] = {}
    aliases = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def _drop_aliases(module: BlipModel, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for alias in module._aliases:
        state_dict.pop(prefix + alias, None)


def _fill_aliases(module: BlipModel, state_dict: dict, prefix: str, *args: Any) -> None:
    for alias, key in module._aliases.items():
        if prefix + key in state_dict:
            state_dict.setdefault(prefix + alias, state_dict[prefix + key])


def _penalise_repeats(logits: Tensor, seqs: Tensor, penalty: float) -> Tensor:
    """CTRL's repetition penalty on every token already in the sequence (prompt included)."""
    if penalty == 1.0:
        return logits
    seen = logits.gather(1, seqs)
    return logits.scatter(1, seqs, torch.where(seen > 0, seen / penalty, seen * penalty))


def _nucleus_sample(logp: Tensor, top_p: float, generator: torch.Generator | None) -> Tensor:
    """One token per row from the smallest set of tokens whose probability reaches `top_p`."""
    probs = logp.exp()
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # drop a token when the tokens before it already reach top_p (the first is always kept)
    drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    pick = torch.multinomial(sorted_probs, 1, generator=generator)  # (b, 1)
    return order.gather(1, pick).squeeze(1)
