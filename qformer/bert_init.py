"""Start the Q-Former's trunk from a pretrained Hugging Face BERT, as BLIP-2 does.

The original builds its Q-Former from bert-base-uncased; here any BERT checkpoint works, named on
the hub or as a local directory, through the ordinary `from_pretrained` path (so offline use only
needs the files on disk). Three steps, kept apart so that building a model never downloads:

    tokenizer = load_tokenizer(name)             # BERT's tokenizer plus `[DEC]`
    config = config_from_bert(name, ...)         # a QFormerConfig whose shapes match the checkpoint
    report = init_from_bert(Stage1Model(config), name)

What comes from BERT: word and position embeddings, the embedding LayerNorm, and per layer the
self-attention and the FFN, which initialises both the text FFN and the query FFN (as the
original's stage 1 does). With a checkpoint saved from `BertForMaskedLM` / `BertLMHeadModel`, its
prediction head also initialises `Stage1Model.lm_head`. What stays fresh: the queries, the
cross-attention and the stage-1 heads. The returned `LoadReport` lists both, and in `skipped` the
BERT weights nothing reads (the pooler, the next-sentence head, ...), by BERT's names.

Legend: V BERT's vocabulary, V' ours (V plus the added tokens, `[DEC]` first), d width, P positions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedConfig, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_NAME, cached_file

from qformer.checkpoint import CheckpointError, LoadReport, load_state_dict_strict
from qformer.config import QFormerConfig
from qformer.model import ACTIVATIONS, QFormer
from qformer.stage1 import Stage1Model

# The BOS token of the ITG decoder; the original adds it to BERT's tokenizer under this name.
DEC_TOKEN = "[DEC]"
_ACTIVATIONS = tuple(ACTIVATIONS)  # those `qformer.model` implements exactly as BERT does


# ---------------------------------------------------------------------------------- tokenizer
def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """BERT's tokenizer with `[DEC]` added as a special token and made the BOS token."""
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    problems = []
    # Captions are batched with padding, and the padding is masked by `attention_mask`.
    if tokenizer.pad_token is None:
        problems.append(
            "it has no pad token, and captions are padded to a common length in every batch. "
            "Add one and save the tokenizer to a directory, then pass that directory: "
            "`tok.add_special_tokens({'pad_token': '[PAD]'}); tok.save_pretrained(DIR)`"
        )
    # The model reads the ITC text feature at position 0 and ITG overwrites position 0 with
    # `[DEC]`, so every caption must start with a [CLS]-like token that the tokenizer adds itself.
    cls_id = tokenizer.cls_token_id
    if cls_id is None or tokenizer("a")["input_ids"][:1] != [cls_id]:
        problems.append(
            "it does not start every text with a [CLS] token, which the Q-Former reads at position 0 "
            "(ITC) and replaces by [DEC] (ITG); use a BERT tokenizer"
        )
    if problems:
        raise ValueError(
            f"Tokenizer of {str(name_or_path)!r} cannot serve the Q-Former:\n  - " + "\n  - ".join(problems)
        )
    # Idempotent: a tokenizer saved after this call already holds `[DEC]` and keeps its id.
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    # Position 0 must be [CLS] (see above), which left padding would break.
    tokenizer.padding_side = "right"
    return tokenizer


def check_tokenizer_fits(tokenizer: PreTrainedTokenizerBase, config: QFormerConfig, source: str) -> None:
    """Refuse a tokenizer whose vocabulary, [DEC] or [PAD] id disagrees with the Q-Former
    `config` that `source` was trained with."""
    dec, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    if len(tokenizer) > config.vocab_size or (dec, pad) != (config.dec_token_id, config.pad_token_id):
        raise ValueError(
            f"{source}: the tokenizer does not fit its Q-Former: {len(tokenizer)} tokens, [DEC] = {dec}, "
            f"[PAD] = {pad}, against a vocabulary of {config.vocab_size} with [DEC] = {config.dec_token_id} "
            f"and [PAD] = {config.pad_token_id}. Use the tokenizer the model was trained with (BERT's, "
            "with `[DEC]` added as the BOS token)."
        )


# ---------------------------------------------------------------------------------- config
def read_bert_config(name_or_path: str | Path) -> PreTrainedConfig:
    """The checkpoint's config, rejected unless `init_from_bert` can map it exactly."""
    bert = AutoConfig.from_pretrained(str(name_or_path))
    problems = []
    if bert.model_type != "bert":
        problems.append(
            f"model_type is {bert.model_type!r}, not 'bert': only BertModel's layout is mapped "
            "(RoBERTa offsets its positions, ELECTRA factorises its embeddings, ...)"
        )
    # transformers 5's BertModel no longer implements relative positions and would load such a
    # checkpoint as if it were absolute, silently computing something else; refuse it here.
    position_type = getattr(bert, "position_embedding_type", "absolute")
    if position_type != "absolute":
        problems.append(
            f"position_embedding_type is {position_type!r}; the Q-Former has absolute position "
            "embeddings only"
        )
    if getattr(bert, "hidden_act", None) not in _ACTIVATIONS:
        problems.append(
            f"hidden_act is {getattr(bert, 'hidden_act', None)!r}; the Q-Former supports {', '.join(_ACTIVATIONS)}"
        )
    if problems:
        raise ValueError(
            f"{str(name_or_path)!r} is not a BERT checkpoint the Q-Former can start from:\n  - "
            + "\n  - ".join(problems)
        )
    return bert


def config_from_bert(
    name_or_path: str | Path,
    *,
    num_query_tokens: int = 32,
    cross_attention_freq: int = 2,
    vision_width: int = 1408,
    embed_dim: int = 256,
    **overrides: Any,
) -> QFormerConfig:
    """A QFormerConfig whose trunk matches the BERT checkpoint, vocabulary extended by `[DEC]`.

    overrides: any other QFormerConfig field (e.g. `hidden_dropout=0.0`), applied last. A `meta`
    override is merged with the provenance recorded here.
    """
    bert = read_bert_config(name_or_path)
    tokenizer = load_tokenizer(name_or_path)
    # BERT's own pad id, else the tokenizer's; if both exist they must agree, or the embedding's
    # padding row would not be the row the padded positions actually use.
    pad_token_id = bert.pad_token_id if bert.pad_token_id is not None else tokenizer.pad_token_id
    if pad_token_id != tokenizer.pad_token_id:
        raise ValueError(
            f"{str(name_or_path)!r}: the BERT config's pad_token_id ({bert.pad_token_id}) is not the "
            f"tokenizer's ({tokenizer.pad_token_id}); fix one of them in the checkpoint directory."
        )
    # Some checkpoints pad their embedding table beyond the tokenizer; keep every BERT row then.
    vocab_size = max(len(tokenizer), bert.vocab_size)
    meta = {"bert": str(name_or_path), **overrides.pop("meta", {})}
    fields = dict(
        num_layers=bert.num_hidden_layers,
        hidden_size=bert.hidden_size,
        num_heads=bert.num_attention_heads,
        intermediate_size=bert.intermediate_size,
        hidden_act=bert.hidden_act,
        layer_norm_eps=bert.layer_norm_eps,
        hidden_dropout=bert.hidden_dropout_prob,
        attention_dropout=bert.attention_probs_dropout_prob,
        vocab_size=vocab_size,
        max_position_embeddings=bert.max_position_embeddings,
        pad_token_id=pad_token_id,
        dec_token_id=tokenizer.convert_tokens_to_ids(DEC_TOKEN),
        num_query_tokens=num_query_tokens,
        cross_attention_freq=cross_attention_freq,
        vision_width=vision_width,
        embed_dim=embed_dim,
        initializer_range=bert.initializer_range,
    )
    return QFormerConfig.from_dict({**fields, **overrides, "meta": meta})


# ---------------------------------------------------------------------------------- weights
# Our name -> BERT's name, inside one layer (`layers.N.` / `encoder.layer.N.`); weight and bias each.
_SELF_ATTENTION = {
    "self_attn.q": "attention.self.query",
    "self_attn.k": "attention.self.key",
    "self_attn.v": "attention.self.value",
    "self_attn.out": "attention.output.dense",
    "self_attn.norm": "attention.output.LayerNorm",
}
_FFN = {"fc1": "intermediate.dense", "fc2": "output.dense", "norm": "output.LayerNorm"}
_LM_HEAD = {"dense": "cls.predictions.transform.dense", "norm": "cls.predictions.transform.LayerNorm"}

# Why a BERT weight is not used, by a part of its name (first match wins).
_UNUSED = (
    ("pooler.", "BERT's pooler: the Q-Former has none, text_proj reads [CLS] directly"),
    ("cls.seq_relationship.", "BERT's next-sentence head: the Q-Former has none"),
    ("cls.predictions.decoder.", "the LM head's output matrix is tied to the word embeddings"),
    ("cls.predictions.", "a bare QFormer has no LM head: initialise a Stage1Model to use it"),
    (".crossattention.", "BERT's own cross-attention: the Q-Former's attends to image tokens, starts fresh"),
    ("", "not part of the Q-Former"),
)


def init_from_bert(model: QFormer | Stage1Model, name_or_path: str | Path) -> LoadReport:
    """Copy a BERT checkpoint's weights into `model`'s trunk (and LM head), in place.

    `model` must be built from a config matching the checkpoint, i.e. `config_from_bert(name)`;
    any difference raises before anything is copied. Returns the report: `loaded` and `missing`
    (what stays fresh) are our keys, `skipped` are BERT's unused weights with the reason.
    """
    name = str(name_or_path)
    if isinstance(model, Stage1Model):
        qformer, prefix, has_lm_head = model.qformer, "qformer.", True
    elif isinstance(model, QFormer):
        qformer, prefix, has_lm_head = model, "", False
    else:
        raise TypeError(f"init_from_bert takes a QFormer or a Stage1Model, got {type(model).__name__}")
    bert_config = read_bert_config(name)
    _check_architecture(qformer.config, bert_config, name)

    # step 1: BERT's weights
    bert = read_bert_weights(name)

    # step 2: map BERT's names to ours, checking every shape before anything is copied
    pairs = {
        "embeddings.word.weight": "embeddings.word_embeddings.weight",
        "embeddings.position.weight": "embeddings.position_embeddings.weight",
        "embeddings.norm.weight": "embeddings.LayerNorm.weight",
        "embeddings.norm.bias": "embeddings.LayerNorm.bias",
    }
    blocks = {
        **_SELF_ATTENTION,
        **{f"ffn_text.{k}": v for k, v in _FFN.items()},
        # the query FFN starts as a copy of the text FFN, as in the original's stage 1
        **{f"ffn_query.{k}": v for k, v in _FFN.items()},
    }
    for i in range(len(qformer.layers)):
        for ours, theirs in blocks.items():
            for p in ("weight", "bias"):
                pairs[f"layers.{i}.{ours}.{p}"] = f"encoder.layer.{i}.{theirs}.{p}"
    pairs = {prefix + k: v for k, v in pairs.items()}
    lm_head_from_bert = has_lm_head and "cls.predictions.bias" in bert
    if lm_head_from_bert:
        for ours, theirs in _LM_HEAD.items():
            for p in ("weight", "bias"):
                pairs[f"lm_head.{ours}.{p}"] = f"{theirs}.{p}"
        pairs["lm_head.bias"] = "cls.predictions.bias"
    tensors = _mapped_tensors(model, bert, pairs, name, prefix)

    # step 3: copy. What the checkpoint cannot provide is allowed to stay fresh, nothing else.
    fresh = [prefix + "query_tokens"]
    fresh += [f"{prefix}layers.{i}.cross_attn." for i in qformer.cross_attention_layers]
    if isinstance(model, Stage1Model):
        fresh += ["ln_vision.", "vision_proj.", "text_proj.", "itm_head.", "temp"]
        if not lm_head_from_bert:
            fresh.append("lm_head.")
    report = load_state_dict_strict(model, tensors, allow_missing=tuple(fresh), source=f"BERT {name!r}")

    # step 4: account for every BERT weight nothing read
    used = set(pairs.values()) | {"embeddings.token_type_embeddings.weight"}
    for key in sorted(set(bert) - used):
        report.skipped[key] = next(reason for part, reason in _UNUSED if part in key)
    return report


def read_bert_weights(name_or_path: str | Path) -> dict[str, Tensor]:
    """A BERT checkpoint's tensors under BertModel's names (plus `cls.*`, its masked-LM head, when
    it has one), read through the ordinary loading path (hub cache or local directory)."""
    name = str(name_or_path)
    # Keys AutoModel reports missing (the pooler of a BertForMaskedLM checkpoint) were not in the
    # checkpoint but initialised at random: they are not BERT's weights, so they are dropped.
    # (quietly: transformers' own table would call the dropped head "unexpected" and the pooler
    # "missing"; `init_from_bert` returns the report that says what was used)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        bert_model, info = AutoModel.from_pretrained(name, output_loading_info=True, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    bert = {k: v.detach() for k, v in bert_model.state_dict().items() if k not in info["missing_keys"]}
    del bert_model
    # AutoModel drops a masked-LM checkpoint's prediction head; read it from the files directly.
    if any(k.startswith("cls.") for k in info["unexpected_keys"]):
        bert.update(_read_checkpoint_tensors(name, prefix="cls."))
    return bert


def _check_architecture(config: QFormerConfig, bert: PreTrainedConfig, name: str) -> None:
    """Differences that leave every shape intact but change what the weights compute."""
    pairs = [
        ("num_layers", "num_hidden_layers"),
        ("num_heads", "num_attention_heads"),
        ("hidden_act", "hidden_act"),
        ("layer_norm_eps", "layer_norm_eps"),
    ]
    problems = [
        f"`{ours}` is {getattr(config, ours)!r}, the checkpoint's {theirs} is {getattr(bert, theirs)!r}"
        for ours, theirs in pairs
        if getattr(config, ours) != getattr(bert, theirs)
    ]
    if problems:
        raise CheckpointError(
            f"The QFormerConfig does not match BERT {name!r}:\n  - " + "\n  - ".join(problems)
            + f"\nBuild the config with `config_from_bert({name!r}, ...)`."
        )


def _mapped_tensors(
    model: QFormer | Stage1Model, bert: dict[str, Tensor], pairs: dict[str, str], name: str, prefix: str
) -> dict[str, Tensor]:
    """Our key -> tensor, with the two places where BERT's tensors need more than a copy."""
    own = model.state_dict()
    problems, out = [], {}
    for ours, theirs in pairs.items():
        if theirs not in bert:
            problems.append(f"{theirs} (for {ours}) is not in the checkpoint")
            continue
        have, want = tuple(bert[theirs].shape), tuple(own[ours].shape)
        # Added tokens ([DEC] first) extend the vocabulary: those tables may have extra rows.
        extendable = ours in (prefix + "embeddings.word.weight", "lm_head.bias")
        ok = (have[1:] == want[1:] and have[0] <= want[0]) if extendable else have == want
        if not ok:
            problems.append(f"{theirs} -> {ours}: checkpoint {have} vs model {want}")
        out[ours] = bert[theirs].float()
    if problems:
        raise CheckpointError(
            f"Cannot initialise {type(model).__name__} from BERT {name!r}:\n  - " + "\n  - ".join(problems)
            + f"\nThe config was built for another checkpoint; use `config_from_bert({name!r}, ...)`."
        )

    # The rows BERT lacks (added tokens, [DEC] first) start at the mean of BERT's rows, as
    # transformers' `resize_token_embeddings` does now: an average word, not a random vector far
    # from all the others. The LM head's bias for them gets the mean bias, for the same reason.
    for key in (prefix + "embeddings.word.weight", "lm_head.bias"):
        if key in out and out[key].shape[0] < own[key].shape[0]:
            rows = out[key]
            extra = rows.mean(dim=0, keepdim=True).expand(own[key].shape[0] - rows.shape[0], *rows.shape[1:])
            out[key] = torch.cat([rows, extra], dim=0)  # (V', d) or (V',)

    # The Q-Former has no token types. BERT adds token_type_embeddings[type] to every token, and
    # our texts are all type 0, so we fold that row into the position table: word + (position +
    # type0) is what BERT computes on one segment, and the text-only trunk equals BERT's exactly.
    # The original instead drops token types, so its text pass starts off BERT's by that vector.
    token_types = bert.get("embeddings.token_type_embeddings.weight")
    if token_types is not None:
        key = prefix + "embeddings.position.weight"
        if token_types.shape[1:] != out[key].shape[1:]:
            raise CheckpointError(
                f"Cannot initialise from BERT {name!r}: embeddings.token_type_embeddings.weight "
                f"{tuple(token_types.shape)} does not match {key} {tuple(out[key].shape)}."
            )
        out[key] = out[key] + token_types[0].float()  # (P, d)
    return out


def _read_checkpoint_tensors(name: str, *, prefix: str) -> dict[str, Tensor]:
    """The tensors under `prefix` in the checkpoint's weight files, under today's names.

    Old checkpoints (bert-base-uncased among them) name LayerNorm parameters gamma/beta; the
    ordinary loading path renames them, and so do we.
    """
    out = {}
    for path in _weight_files(name):
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        else:  # pytorch_model.bin: a pickled state dict, read without running code
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
            tensors = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
        for key, value in tensors.items():
            key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
            out[key] = value
    return out


def _weight_files(name: str) -> list[str]:
    """Paths of the checkpoint's weight files: local directory or hub cache, sharded or not."""

    def find(filename: str) -> str | None:
        local = Path(name) / filename
        if local.is_file():
            return str(local)
        if Path(name).is_dir():
            return None
        return cached_file(
            name,
            filename,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )

    if path := find(SAFE_WEIGHTS_NAME):
        return [path]
    if index := find(SAFE_WEIGHTS_INDEX_NAME):
        shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        return [p for shard in shards if (p := find(shard))]
    if path := find(WEIGHTS_NAME):
        return [path]
    return []
