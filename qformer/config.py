"""The Q-Former's architecture as one dataclass, with presets by name.

Run settings (learning rates, batch sizes, data) live in the recipes' YAML files; this file only
describes the network, so that a checkpoint directory can rebuild its model from `config.json`
without the YAML that trained it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# Token id of `[DEC]` when it is appended to the bert-base-uncased vocabulary (30522 words):
# the original adds it as the tokenizer's BOS token and resizes the embeddings to 30523.
BERT_BASE_VOCAB = 30522


@dataclass
class QFormerConfig:
    # --- the BERT trunk (bert-base-uncased in the original) ---
    num_layers: int = 12
    hidden_size: int = 768
    num_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: Literal["gelu", "gelu_new", "relu"] = "gelu"
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    # BERT's 30522 words plus `[DEC]`, the BOS token of the ITG decoder.
    vocab_size: int = BERT_BASE_VOCAB + 1
    max_position_embeddings: int = 512
    pad_token_id: int = 0
    dec_token_id: int = BERT_BASE_VOCAB
    # --- what makes it a Q-Former ---
    num_query_tokens: int = 32
    # Cross-attention to the image sits in layers where `layer_idx % cross_attention_freq == 0`.
    cross_attention_freq: int = 2
    # Width of the frozen vision tower's tokens (1408 for EVA ViT-g/14).
    vision_width: int = 1408
    # eps of `ln_vision`, the trainable LayerNorm on the tower's tokens: 1e-5 in LAVIS (torch's
    # default); transformers' BLIP-2 configs put 1e-6 on the same LayerNorm (`post_layernorm`).
    vision_layer_norm_eps: float = 1e-5
    # --- stage-1 heads ---
    embed_dim: int = 256  # ITC projection width (vision_proj / text_proj)
    init_temp: float = 0.07
    initializer_range: float = 0.02
    # Free-form provenance, e.g. the BERT checkpoint the trunk was initialised from.
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("Invalid QFormerConfig:\n  - " + "\n  - ".join(problems))

    def problems(self) -> list[str]:
        """Every problem with this config, not just the first one."""
        p: list[str] = []
        positive = [
            "num_layers", "hidden_size", "num_heads", "intermediate_size", "vocab_size",
            "max_position_embeddings", "num_query_tokens", "cross_attention_freq", "vision_width",
            "embed_dim",
        ]  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                p.append(f"`{name}` must be a positive integer, got {value!r}")
        if isinstance(self.hidden_size, int) and isinstance(self.num_heads, int) and self.num_heads > 0:
            if self.hidden_size % self.num_heads:
                p.append(
                    f"`hidden_size` ({self.hidden_size}) must be divisible by `num_heads` "
                    f"({self.num_heads}); change one of them"
                )
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                p.append(f"`{name}` must be in [0, 1), got {value!r}")
        if self.hidden_act not in ("gelu", "gelu_new", "relu"):
            p.append(f"`hidden_act` must be one of gelu, gelu_new, relu, got {self.hidden_act!r}")
        if not self.init_temp > 0:
            p.append(f"`init_temp` must be > 0, got {self.init_temp!r}")
        if isinstance(self.vocab_size, int):
            for name in ("pad_token_id", "dec_token_id"):
                value = getattr(self, name)
                if not 0 <= value < self.vocab_size:
                    p.append(f"`{name}` ({value}) must be a token id below `vocab_size` ({self.vocab_size})")
        return p

    # --- (de)serialisation ---
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QFormerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"Unknown QFormerConfig keys {unknown}; valid keys are {sorted(known)}"
            )
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_file(cls, path: str | Path) -> QFormerConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> QFormerConfig:
        if name not in PRESETS:
            raise ValueError(f"Unknown Q-Former preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> QFormerConfig:
        return dataclasses.replace(self, **changes)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def has_cross_attention(self, layer_idx: int) -> bool:
        return layer_idx % self.cross_attention_freq == 0


PRESETS: dict[str, dict[str, Any]] = {
    # BLIP-2 as published: bert-base-uncased trunk, 32 queries, EVA ViT-g/14 tokens (width 1408).
    "blip2": {},
    # For tests and CPU smoke runs: a few thousand parameters per layer, same structure.
    "tiny": dict(
        num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64, vocab_size=100,
        max_position_embeddings=40, dec_token_id=99, num_query_tokens=4, cross_attention_freq=2,
        vision_width=24, embed_dim=16,
    ),  # fmt: skip
}


def list_presets() -> list[str]:
    return sorted(PRESETS)
