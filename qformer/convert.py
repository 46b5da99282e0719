"""Convert Q-Former weights between our layout, transformers' BLIP-2 classes and LAVIS checkpoints.

Three layouts hold the same tensors under different names:

* ours: `Stage1Model` (`qformer.layers.N.self_attn.q.weight`, `ln_vision.weight`, ...);
* transformers: `Blip2QFormerModel` holds the layers and the embedding LayerNorm; the model around
  it (`Blip2ForImageTextRetrieval`) holds the query tokens, the word/position embeddings, the heads
  and the vision tower, whose `post_layernorm` plays the role of our `ln_vision`;
* LAVIS (the original `Blip2Qformer`, e.g. `blip2_pretrained.pth`): a BERT LM under `Qformer.`,
  with the heads and `ln_vision` beside it.

Every conversion is an explicit table of names below, read in either direction; nothing is matched
by guessing. Loading is strict: a source key that no rule knows is reported as unexpected, a key of
ours left unfilled as missing, a wrong shape with both shapes; keys deliberately left out (the
vision tower, the LLM) are listed in `LoadReport.skipped` with the reason.

Legend: q queries, d width, d_v vision width, e ITC embedding width, V vocabulary.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import Blip2Config, Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

from qformer.checkpoint import CheckpointError, LoadReport, load_state_dict_strict
from qformer.config import QFormerConfig
from qformer.model import QFormer
from qformer.stage1 import Stage1Model

# ---------------------------------------------------------------------------------------------
# Name tables. A rule pairs one of our module paths with the other layout's; `{N}` stands for a
# layer index. A parameter suffix (`.weight`, `.bias`) carries over unchanged; a rule naming a bare
# parameter (`query_tokens`, `temp`) matches exactly that key.
# ---------------------------------------------------------------------------------------------
Rule = tuple[str, str]  # (ours, theirs)

# One Q-Former layer: ours -> transformers `Blip2QFormerLayer`.
HF_LAYER_NAMES: list[Rule] = [
    ("self_attn.q", "attention.attention.query"),
    ("self_attn.k", "attention.attention.key"),
    ("self_attn.v", "attention.attention.value"),
    ("self_attn.out", "attention.output.dense"),
    ("self_attn.norm", "attention.output.LayerNorm"),
    ("cross_attn.q", "crossattention.attention.query"),
    ("cross_attn.k", "crossattention.attention.key"),
    ("cross_attn.v", "crossattention.attention.value"),
    ("cross_attn.out", "crossattention.output.dense"),
    ("cross_attn.norm", "crossattention.output.LayerNorm"),
    ("ffn_query.fc1", "intermediate_query.dense"),
    ("ffn_query.fc2", "output_query.dense"),
    ("ffn_query.norm", "output_query.LayerNorm"),
    # the text FFN exists in transformers only with `use_qformer_text_input=True`
    ("ffn_text.fc1", "intermediate.dense"),
    ("ffn_text.fc2", "output.dense"),
    ("ffn_text.norm", "output.LayerNorm"),
]

# One Q-Former layer: ours -> LAVIS (a BERT layer, `self` where transformers says `attention`).
LAVIS_LAYER_NAMES: list[Rule] = [
    ("self_attn.q", "attention.self.query"),
    ("self_attn.k", "attention.self.key"),
    ("self_attn.v", "attention.self.value"),
    ("self_attn.out", "attention.output.dense"),
    ("self_attn.norm", "attention.output.LayerNorm"),
    ("cross_attn.q", "crossattention.self.query"),
    ("cross_attn.k", "crossattention.self.key"),
    ("cross_attn.v", "crossattention.self.value"),
    ("cross_attn.out", "crossattention.output.dense"),
    ("cross_attn.norm", "crossattention.output.LayerNorm"),
    ("ffn_query.fc1", "intermediate_query.dense"),
    ("ffn_query.fc2", "output_query.dense"),
    ("ffn_query.norm", "output_query.LayerNorm"),
    ("ffn_text.fc1", "intermediate.dense"),
    ("ffn_text.fc2", "output.dense"),
    ("ffn_text.norm", "output.LayerNorm"),
]

# Our `QFormer` <-> the keys of a transformers `Blip2QFormerModel`. transformers applies the
# embedding LayerNorm inside the Q-Former module, to the [queries; text] sequence, as we do.
HF_QFORMER_NAMES: list[Rule] = [
    ("embeddings.norm", "layernorm"),
    *[(f"layers.{{N}}.{ours}", f"encoder.layer.{{N}}.{theirs}") for ours, theirs in HF_LAYER_NAMES],
]

# Parts of our `QFormer` that transformers keeps outside `Blip2QFormerModel`, in the model that
# holds it (`Blip2ForImageTextRetrieval`, `Blip2Model`, ...).
HF_OUTSIDE_QFORMER_NAMES: list[Rule] = [
    ("query_tokens", "query_tokens"),
    ("embeddings.word", "embeddings.word_embeddings"),
    ("embeddings.position", "embeddings.position_embeddings"),
]

# Our `Stage1Model` <-> transformers `Blip2ForImageTextRetrieval`.
HF_RETRIEVAL_NAMES: list[Rule] = [
    *[(f"qformer.{ours}", theirs) for ours, theirs in HF_OUTSIDE_QFORMER_NAMES],
    *[(f"qformer.{ours}", f"qformer.{theirs}") for ours, theirs in HF_QFORMER_NAMES],
    # transformers counts the trainable LayerNorm on the frozen tokens as the vision tower's last
    # norm. Its eps is `vision_config.layer_norm_eps` (1e-6 in the released configs, where LAVIS
    # uses 1e-5): the config conversions carry it as `QFormerConfig.vision_layer_norm_eps`.
    ("ln_vision", "vision_model.post_layernorm"),
    ("vision_proj", "vision_projection"),
    ("text_proj", "text_projection"),
    ("itm_head", "itm_head"),
]

# Our `Stage2Model`'s own weights (its trainable state dict) <-> transformers
# `Blip2ForConditionalGeneration`. There the Q-Former has neither word/position embeddings nor the
# text FFN (`use_qformer_text_input=False`): stage 2 runs the query path only, as ours does. The
# frozen bridges map separately (qformer/hf_blip2.py): the tower to `vision_model.*`, the LLM to
# `language_model.*`.
HF_STAGE2_NAMES: list[Rule] = [
    ("qformer.query_tokens", "query_tokens"),
    *[(f"qformer.{ours}", f"qformer.{theirs}") for ours, theirs in HF_QFORMER_NAMES],
    ("ln_vision", "vision_model.post_layernorm"),
    ("proj", "language_projection"),
]

# Our `Stage1Model` <-> LAVIS `Blip2Qformer`.
LAVIS_NAMES: list[Rule] = [
    ("qformer.query_tokens", "query_tokens"),
    ("qformer.embeddings.word", "Qformer.bert.embeddings.word_embeddings"),
    ("qformer.embeddings.position", "Qformer.bert.embeddings.position_embeddings"),
    ("qformer.embeddings.norm", "Qformer.bert.embeddings.LayerNorm"),
    *[
        (f"qformer.layers.{{N}}.{ours}", f"Qformer.bert.encoder.layer.{{N}}.{theirs}")
        for ours, theirs in LAVIS_LAYER_NAMES
    ],
    # BERT's prediction head. Its output matrix (`decoder.weight`) is tied to the word embeddings;
    # ours reads the word embeddings at call time instead of storing a copy (checked in
    # `_check_lavis_ties`).
    ("lm_head.dense", "Qformer.cls.predictions.transform.dense"),
    ("lm_head.norm", "Qformer.cls.predictions.transform.LayerNorm"),
    ("lm_head.bias", "Qformer.cls.predictions.bias"),
    ("ln_vision", "ln_vision"),
    ("vision_proj", "vision_proj"),
    ("text_proj", "text_proj"),
    ("itm_head", "itm_head"),
    ("temp", "temp"),
]

# Keys deliberately left out, by prefix, with the reason reported in `LoadReport.skipped`.
# Rename rules are tried first, so `vision_model.post_layernorm` is read although `vision_model.`
# is skipped.
VISION_TOWER = "vision tower (frozen): load it with the vision bridge, not with the Q-Former"
POSITION_IDS = "buffer of position indices 0..max_position_embeddings-1, rebuilt at construction"
HF_IMPORT_SKIP: list[tuple[str, str]] = [
    ("vision_model.", VISION_TOWER),
    ("embeddings.position_ids", POSITION_IDS),  # persistent in older transformers versions
]
HF_EXPORT_SKIP: list[tuple[str, str]] = [
    ("lm_head.", "Blip2ForImageTextRetrieval has no LM head (it serves ITC and ITM, not ITG)"),
    ("temp", "Blip2ForImageTextRetrieval returns raw cosine similarities: no temperature"),
]
# What transformers lacks stays as initialised on import: reported missing, but not an error.
NOT_IN_HF_RETRIEVAL = ("lm_head.", "temp")

LLM_PROJECTION = "stage-2 projection into the LLM: not part of a stage-1 model"
LLM = "frozen language model (stage 2): not part of a stage-1 model"
LAVIS_SKIP: list[tuple[str, str]] = [
    ("Qformer.bert.embeddings.position_ids", POSITION_IDS),
    ("Qformer.cls.predictions.decoder.weight", "tied to the word embeddings (checked equal); our LM head reads them"),
    ("Qformer.cls.predictions.decoder.bias", "tied to Qformer.cls.predictions.bias (checked equal)"),
    ("visual_encoder.", VISION_TOWER),
    ("opt_proj.", LLM_PROJECTION),
    ("t5_proj.", LLM_PROJECTION),
    ("llm_proj.", LLM_PROJECTION),
    ("opt_model.", LLM),
    ("t5_model.", LLM),
    ("llm_model.", LLM),
]


# ---------------------------------------------------------------------------------------------
# The renaming engine: apply a table to a state dict, sort every key into renamed, skipped or
# unmatched.
# ---------------------------------------------------------------------------------------------
@dataclass
class Converted:
    state_dict: dict[str, Tensor] = field(default_factory=dict)  # under the target's names
    source_names: dict[str, str] = field(default_factory=dict)  # target name -> source name
    skipped: dict[str, str] = field(default_factory=dict)  # source name -> why it was left out
    unmatched: list[str] = field(default_factory=list)  # source names that no rule knows


def _compile(rules: list[Rule], *, reverse: bool) -> list[tuple[re.Pattern[str], str]]:
    """Rules as (pattern on the source name, target template); `reverse` reads theirs -> ours."""
    compiled = []
    for ours, theirs in rules:
        source, target = (theirs, ours) if reverse else (ours, theirs)
        pattern = re.escape(source).replace(r"\{N\}", r"(?P<N>\d+)") + r"(?P<suffix>\.weight|\.bias)?"
        compiled.append((re.compile(pattern), target))
    return compiled


def _apply(compiled: list[tuple[re.Pattern[str], str]], key: str) -> str | None:
    for pattern, target in compiled:
        match = pattern.fullmatch(key)
        if match:
            layer = match.groupdict().get("N")
            return (target.replace("{N}", layer) if layer is not None else target) + (match["suffix"] or "")
    return None


def rename(key: str, rules: list[Rule], *, reverse: bool = False) -> str | None:
    """The name of `key` in the other layout, or None when no rule matches it."""
    return _apply(_compile(rules, reverse=reverse), key)


def convert_state_dict(
    state_dict: dict[str, Tensor],
    rules: list[Rule],
    *,
    reverse: bool = False,
    skip: Sequence[tuple[str, str]] = (),
) -> Converted:
    """Rename every key of `state_dict` by `rules` (ours -> theirs, or theirs -> ours with
    `reverse`); keys no rule renames are skipped when `skip` has a prefix for them, else unmatched."""
    compiled = _compile(rules, reverse=reverse)
    out = Converted()
    for key, value in state_dict.items():
        target = _apply(compiled, key)
        if target is not None:
            assert target not in out.state_dict, f"two keys map to {target}: the name table is not one-to-one"
            out.state_dict[target] = value
            out.source_names[target] = key
        elif reason := next((why for prefix, why in skip if key.startswith(prefix)), None):
            out.skipped[key] = reason
        else:
            out.unmatched.append(key)
    return out


def _load(
    module: nn.Module,
    converted: Converted,
    *,
    strict: bool,
    allow_missing: tuple[str, ...] = (),
    source: str,
) -> LoadReport:
    """`load_state_dict_strict` plus the conversion's own findings: unmatched source keys are
    unexpected, skipped ones are listed, and problems are named by the source's key names.

    Only ever called on a freshly built module, so a failed load leaves nothing half-filled behind.
    """
    report = load_state_dict_strict(
        module, converted.state_dict, strict=False, allow_missing=allow_missing, source=source
    )

    def named(key: str) -> str:  # the source's name, and ours where they differ
        theirs = converted.source_names.get(key, key)
        return key if theirs == key else f"{theirs} (ours: {key})"

    # a renamed key the module lacks, e.g. cross-attention in a layer the config has without it
    report.unexpected = converted.unmatched + [named(k) for k in report.unexpected]
    report.mismatched = [named(key) + ":" + rest for key, _, rest in (e.partition(":") for e in report.mismatched)]
    report.skipped.update(converted.skipped)
    fatal_missing = [k for k in report.missing if not k.startswith(allow_missing)]
    if strict and (fatal_missing or report.unexpected or report.mismatched):
        raise CheckpointError(
            f"Cannot load {source} into {type(module).__name__}:\n{report.summary()}\n"
            "Unexpected keys match no rule of the name tables in qformer/convert.py; missing keys are "
            "ours that the source does not fill. Check that the config matches the checkpoint "
            "(num_layers, cross_attention_freq, widths), or pass `strict=False` to inspect the report."
        )
    return report


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
def to_hf_qformer_config(cfg: QFormerConfig) -> Blip2QFormerConfig:
    """The transformers config of our Q-Former. It has no place for the number of queries or the
    ITC width: those live in `Blip2Config` (see `to_hf_retrieval_config`)."""
    return Blip2QFormerConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_act=cfg.hidden_act,
        hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.initializer_range,
        layer_norm_eps=cfg.layer_norm_eps,
        pad_token_id=cfg.pad_token_id,
        cross_attention_frequency=cfg.cross_attention_freq,
        encoder_hidden_size=cfg.vision_width,
        # our Q-Former always has the text FFN: the ITC text pass, ITM and ITG need it
        use_qformer_text_input=True,
    )


def from_hf_qformer_config(
    hf_cfg: Blip2QFormerConfig, *, num_query_tokens: int, embed_dim: int = 256, **overrides: Any
) -> QFormerConfig:
    """Our config from a transformers `Blip2QFormerConfig`; `overrides` set any of our fields.

    Raises ValueError naming the transformers field when the config cannot be expressed as ours.
    """
    fields: dict[str, Any] = dict(
        num_layers=hf_cfg.num_hidden_layers,
        hidden_size=hf_cfg.hidden_size,
        num_heads=hf_cfg.num_attention_heads,
        intermediate_size=hf_cfg.intermediate_size,
        hidden_act=hf_cfg.hidden_act,
        layer_norm_eps=hf_cfg.layer_norm_eps,
        hidden_dropout=hf_cfg.hidden_dropout_prob,
        attention_dropout=hf_cfg.attention_probs_dropout_prob,
        vocab_size=hf_cfg.vocab_size,
        max_position_embeddings=hf_cfg.max_position_embeddings,
        pad_token_id=hf_cfg.pad_token_id,
        # transformers does not record `[DEC]`; the original appends it as the last word of the
        # vocabulary (30522 of 30523)
        dec_token_id=hf_cfg.vocab_size - 1,
        num_query_tokens=num_query_tokens,
        cross_attention_freq=hf_cfg.cross_attention_frequency,
        vision_width=hf_cfg.encoder_hidden_size,
        embed_dim=embed_dim,
        initializer_range=hf_cfg.initializer_range,
        meta={"converted_from": type(hf_cfg).__name__},
    )
    fields.update(overrides)

    # what only a transformers config can get wrong, named by its transformers field
    problems = []
    if "hidden_size" not in overrides and "num_heads" not in overrides:
        if hf_cfg.num_attention_heads > 0 and hf_cfg.hidden_size % hf_cfg.num_attention_heads:
            problems.append(
                f"hidden_size ({hf_cfg.hidden_size}) is not divisible by num_attention_heads "
                f"({hf_cfg.num_attention_heads}): our attention needs equal heads"
            )
    if "hidden_act" not in overrides and hf_cfg.hidden_act not in ("gelu", "gelu_new", "relu"):
        problems.append(f"hidden_act {hf_cfg.hidden_act!r} has no counterpart here (gelu, gelu_new, relu)")
    if "pad_token_id" not in overrides and hf_cfg.pad_token_id is None:
        problems.append("pad_token_id is None; ours needs a token id: pass `pad_token_id=...`")
    if problems:
        raise ValueError(
            f"Cannot express this {type(hf_cfg).__name__} as a QFormerConfig:\n  - " + "\n  - ".join(problems)
        )
    try:
        return QFormerConfig(**fields)
    except ValueError as e:  # anything else, named by our field
        raise ValueError(f"Cannot express this {type(hf_cfg).__name__} as a QFormerConfig: {e}") from e


def to_hf_retrieval_config(cfg: QFormerConfig, vision_config: Blip2VisionConfig) -> Blip2Config:
    """The config of a `Blip2ForImageTextRetrieval` holding our Q-Former and `vision_config`'s tower."""
    if vision_config.hidden_size != cfg.vision_width:
        raise ValueError(
            f"vision_config.hidden_size ({vision_config.hidden_size}) must equal QFormerConfig.vision_width "
            f"({cfg.vision_width}): the cross-attention reads the tower's tokens."
        )
    if vision_config.layer_norm_eps != cfg.vision_layer_norm_eps:
        raise ValueError(
            f"vision_config.layer_norm_eps ({vision_config.layer_norm_eps}) is also the eps of our "
            f"ln_vision, which is {cfg.vision_layer_norm_eps}: set one to the other "
            f"(QFormerConfig.vision_layer_norm_eps) so the export computes what the model computes."
        )
    return Blip2Config(
        vision_config=vision_config,
        qformer_config=to_hf_qformer_config(cfg),
        num_query_tokens=cfg.num_query_tokens,
        image_text_hidden_size=cfg.embed_dim,
        # no image placeholder tokens: `input_ids` are plain text, as our model takes them
        image_token_index=None,
        initializer_range=cfg.initializer_range,
    )


def from_hf_retrieval_config(hf_cfg: Blip2Config, **overrides: Any) -> QFormerConfig:
    """Our config from a `Blip2Config` (the Q-Former part, the number of queries, the ITC width)."""
    return from_hf_qformer_config(
        hf_cfg.qformer_config,
        num_query_tokens=hf_cfg.num_query_tokens,
        embed_dim=hf_cfg.image_text_hidden_size,
        vision_layer_norm_eps=hf_cfg.vision_config.layer_norm_eps,
        **overrides,
    )


# ---------------------------------------------------------------------------------------------
# Our QFormer <-> transformers Blip2QFormerModel (+ query tokens and text embeddings)
# ---------------------------------------------------------------------------------------------
def qformer_from_hf(
    hf_qformer: Blip2QFormerModel,
    query_tokens: Tensor,
    *,
    embeddings: Blip2TextEmbeddings | None = None,
    strict: bool = True,
) -> tuple[QFormer, LoadReport]:
    """Our `QFormer` from a transformers Q-Former and the query tokens (1, q, d) of the model that
    holds it (`model.query_tokens`).

    embeddings: that model's `Blip2TextEmbeddings` (`model.embeddings`, retrieval models only).
        Without them, or when the transformers Q-Former has no text FFN
        (`use_qformer_text_input=False`, as in `Blip2ForConditionalGeneration`), the text-only parts
        stay as initialised and are reported missing: stage 2 never uses them.
    """
    cfg = from_hf_qformer_config(hf_qformer.config, num_query_tokens=query_tokens.shape[1])
    theirs = {"query_tokens": query_tokens.detach(), **hf_qformer.state_dict()}
    allow_missing: tuple[str, ...] = ()
    if embeddings is not None:
        theirs |= {f"embeddings.{k}": v for k, v in embeddings.state_dict().items()}
    else:
        allow_missing += ("embeddings.word.", "embeddings.position.")
    if not hf_qformer.config.use_qformer_text_input:
        allow_missing += tuple(f"layers.{i}.ffn_text." for i in range(cfg.num_layers))
    converted = convert_state_dict(theirs, HF_OUTSIDE_QFORMER_NAMES + HF_QFORMER_NAMES, reverse=True)
    qformer = QFormer(cfg)
    source = type(hf_qformer).__name__
    report = _load(qformer, converted, strict=strict, allow_missing=allow_missing, source=source)
    return qformer, report


def qformer_to_hf(qformer: QFormer) -> tuple[Blip2QFormerModel, Tensor, Blip2TextEmbeddings]:
    """A transformers Q-Former with our weights, plus what transformers keeps beside it: the query
    tokens (1, q, d) and the text embeddings (for `model.query_tokens` / `model.embeddings`)."""
    hf_cfg = to_hf_qformer_config(qformer.config)
    converted = convert_state_dict(qformer.state_dict(), HF_OUTSIDE_QFORMER_NAMES + HF_QFORMER_NAMES)
    assert not converted.unmatched, f"keys of ours missing from the name tables: {converted.unmatched}"
    theirs = converted.state_dict
    hf_qformer, embeddings = Blip2QFormerModel(hf_cfg), Blip2TextEmbeddings(hf_cfg)
    query_tokens = theirs.pop("query_tokens").detach().clone()
    text = {k.removeprefix("embeddings."): theirs.pop(k) for k in list(theirs) if k.startswith("embeddings.")}
    load_state_dict_strict(embeddings, text, source="our QFormer")
    load_state_dict_strict(hf_qformer, theirs, source="our QFormer")
    return hf_qformer, query_tokens, embeddings


# ---------------------------------------------------------------------------------------------
# Our Stage1Model <-> transformers Blip2ForImageTextRetrieval
# ---------------------------------------------------------------------------------------------
def stage1_from_hf_retrieval(
    model_or_state_dict: nn.Module | dict[str, Tensor],
    config: QFormerConfig | None = None,
    *,
    strict: bool = True,
    **options: Any,
) -> tuple[Stage1Model, LoadReport]:
    """A `Stage1Model` from a `Blip2ForImageTextRetrieval` (or its state dict, with `config`).

    The vision tower is skipped (`vision_model.*` except `post_layernorm`, which becomes our
    `ln_vision`). Our LM head and temperature have no counterpart: they stay as initialised and are
    reported missing without failing. `options` go to `Stage1Model`.
    """
    if isinstance(model_or_state_dict, nn.Module):
        config = config or from_hf_retrieval_config(model_or_state_dict.config)
        state_dict, source = model_or_state_dict.state_dict(), type(model_or_state_dict).__name__
    else:
        if config is None:
            raise ValueError(
                "A state dict carries no config: pass `config=` (e.g. `from_hf_retrieval_config(hf_config)`)."
            )
        state_dict, source = model_or_state_dict, "Blip2ForImageTextRetrieval state dict"
    _warn_if_zero_queries(state_dict.get("query_tokens"))
    converted = convert_state_dict(state_dict, HF_RETRIEVAL_NAMES, reverse=True, skip=HF_IMPORT_SKIP)
    model = Stage1Model(config, **options)
    report = _load(model, converted, strict=strict, allow_missing=NOT_IN_HF_RETRIEVAL, source=source)
    return model, report


def stage1_to_hf_retrieval_state_dict(model: Stage1Model) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The Q-Former parts of `model` under `Blip2ForImageTextRetrieval`'s names, with
    `vision_model.post_layernorm.*` (our `ln_vision`) but no other vision tower key; and the keys of
    ours left out, with the reason (the LM head and the temperature).

    The tensors share storage with `model`, as `state_dict()` does. To build the full model, take
    the tower's weights from a transformers vision model and `to_hf_retrieval_config` for the config.
    """
    converted = convert_state_dict(model.state_dict(), HF_RETRIEVAL_NAMES, skip=HF_EXPORT_SKIP)
    assert not converted.unmatched, f"keys of ours missing from the name tables: {converted.unmatched}"
    return converted.state_dict, converted.skipped


def _warn_if_zero_queries(query_tokens: Tensor | None) -> None:
    if query_tokens is not None and not query_tokens.any():
        warnings.warn(
            "query_tokens are all zeros: this looks like an untrained transformers model (transformers 5 "
            "zero-initialises them, and training from zeros explodes on the first backward). Re-initialise "
            "them with `model.qformer.reset_parameters()` or nn.init.normal_(..., std=0.02) before training.",
            stacklevel=3,
        )


# ---------------------------------------------------------------------------------------------
# LAVIS (the original code) -> our Stage1Model
# ---------------------------------------------------------------------------------------------
def load_lavis_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a LAVIS `.pth` (unwrapping `{"model": ...}`) or of a `.safetensors` file.

    `.pth` files are read with `weights_only=True`: a pickle can run code, so anything but tensors
    and plain containers is refused.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a page of advice; keep its one line that names the offending object
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        marker = "WeightsUnpickler error:"
        reason = next((l.split(marker, 1)[1].split(". ")[0].strip() for l in lines if marker in l), lines[0])
        raise CheckpointError(
            f"{path} is not a plain tensor checkpoint: torch.load(weights_only=True) refused it "
            f"({reason}). Only tensors and plain containers are read, because unpickling other objects "
            f"can run code. If you trust the file, re-save its weights as a plain dict: "
            f"torch.save(torch.load(path, weights_only=False)['model'], 'clean.pth')."
        ) from e
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # LAVIS saves {"model": state_dict, "optimizer": ..., "epoch": ...}
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a non-empty dict of tensors.")
    bad = [repr(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(
            f"{path} is not a plain tensor state dict: {len(bad)} entries are not tensors "
            f"({', '.join(bad[:10])}{', ...' if len(bad) > 10 else ''})."
        )
    return obj


def stage1_from_lavis(
    state_dict_or_path: dict[str, Tensor] | str | Path,
    config: QFormerConfig,
    *,
    strict: bool = True,
    allow_missing: tuple[str, ...] = (),
    **options: Any,
) -> tuple[Stage1Model, LoadReport]:
    """A `Stage1Model` from a LAVIS `Blip2Qformer` checkpoint (state dict or file).

    LAVIS checkpoints carry no config: `config` must describe the checkpoint (the original is the
    "blip2" preset with the vision width of its tower). The vision tower and any LLM-side weights
    are skipped. allow_missing: prefixes of ours that may stay as initialised, e.g. `("lm_head.",)`
    for stage-2 checkpoints, where LAVIS deletes the Q-Former's text parts.
    """
    if isinstance(state_dict_or_path, (str, Path)):
        source, state_dict = str(state_dict_or_path), load_lavis_checkpoint(state_dict_or_path)
    else:
        source, state_dict = "LAVIS state dict", state_dict_or_path
    state_dict = _check_lavis_ties(state_dict, source)
    converted = convert_state_dict(state_dict, LAVIS_NAMES, reverse=True, skip=LAVIS_SKIP)
    model = Stage1Model(config, **options)
    report = _load(model, converted, strict=strict, allow_missing=allow_missing, source=source)
    return model, report


def _check_lavis_ties(state_dict: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """The original ties the LM head's output matrix to the word embeddings and its decoder bias to
    the head's bias. Ours stores each once, so a checkpoint where the copies differ cannot be
    represented: refuse it rather than silently drop one copy."""
    ties = [
        ("Qformer.cls.predictions.decoder.weight", "Qformer.bert.embeddings.word_embeddings.weight"),
        ("Qformer.cls.predictions.decoder.bias", "Qformer.cls.predictions.bias"),
    ]
    for copy, original in ties:
        if copy not in state_dict:
            continue
        if original not in state_dict:
            if copy.endswith("bias"):  # the head's bias saved only under the decoder's name
                state_dict = {**state_dict, original: state_dict[copy]}
            continue
        a, b = state_dict[copy], state_dict[original]
        if a.shape != b.shape or not torch.equal(a, b):
            if a.shape == b.shape:
                diff = f"max abs difference {(a - b).abs().max().item():.3g}"
            else:
                diff = f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
            raise CheckpointError(
                f"{source}: {copy} differs from {original} ({diff}). The original ties them and our "
                f"LM head stores one copy, so this checkpoint (untied, or edited) cannot be loaded exactly."
            )
    return state_dict
