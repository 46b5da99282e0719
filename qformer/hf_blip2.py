"""A stage-2 model as a transformers `Blip2ForConditionalGeneration`, and back.

    qformer export --checkpoint runs/stage2/model --format hf-blip2 --out blip2/
    qformer import --from hf-blip2 blip2/ --out imported/

The export writes one directory that `Blip2ForConditionalGeneration.from_pretrained` and
`Blip2Processor.from_pretrained` load, holding the whole pipeline:

* `vision_model`: the frozen tower's blocks up to the one the Q-Former reads (the vision spec's
  `layer`; -2 keeps all but the last), with our `ln_vision` as its `post_layernorm`. transformers
  feeds the Q-Former `vision_model(...).last_hidden_state` = post_layernorm(last block's output),
  which is what our bridge + `ln_vision` compute. A tower exports only when every operation it
  performs has a place in `Blip2VisionModel` (`vision_tower_to_hf`); otherwise the export fails and
  names what has none, instead of writing a model that computes something else.
* `query_tokens`, `qformer.*`, `language_projection`: the Q-Former's query path and `proj`
  (`convert.HF_STAGE2_NAMES`).
* `language_model.*`: the frozen LLM's weights as they are, with `text_config.eos_token_id` set to
  our end of text ("\\n" for OPT, as in the released BLIP-2 OPT checkpoints).
  A LoRA adapter (`llm_lora`, `vision_lora`) is added into the weights it adapts (peft's merge).
* the processor: the LLM's tokenizer plus the image placeholder `<image>`, `num_query_tokens`, and
  an image processor that performs our eval transform. transformers 5 puts the image embeddings where
  the q placeholders are in `input_ids` and silently ignores the image without them, so inputs must
  come from `Blip2Processor(images=..., text=prompt)`.
* `generation_config.json`: our decoding defaults (`LanguageBridge.generate`'s) and end of text.
  `Blip2ForConditionalGeneration.generate` hands only its keyword arguments to the LLM, so pass
  `generation_config=model.generation_config` to decode as `qformer caption` does.
* `qformer_export.json`: the caption prompt, the VQA template and where the model came from.

An instruction-aware checkpoint (`instruction_aware: true`) exports as InstructBLIP instead:
`InstructBlipForConditionalGeneration` with an `InstructBlipProcessor`, whose Q-Former tokenizer
(`qformer_tokenizer/`) is ours. The layouts match: InstructBLIP's Q-Former embeds the instruction
with word + position embeddings (positions from 0), puts the queries in front, normalises the
concatenation with one LayerNorm (`qformer.embeddings.layernorm`, BLIP-2's `qformer.layernorm`),
lets queries and instruction attend to each other, cross-attends with the query positions only and
runs the text FFN (`intermediate`, `output`) on the instruction, as ours does. The processor gives
the same `text` to both tokenizers, as our model reads its LLM prompt as the instruction; pass
`text=""` for captions without a prompt (InstructBLIP needs `qformer_input_ids`). One difference
is transformers': its processor pads the Q-Former's ids on the LLM tokenizer's side, left for a
decoder-only LLM, and the Q-Former does not shift positions for left padding. Ours pads on the
right; for a batch of prompts of different lengths, take `qformer_input_ids` and
`qformer_attention_mask` from `processor.qformer_tokenizer(text, padding=True, padding_side="right")`.

The import reads a `Blip2ForConditionalGeneration` directory into a stage-2 checkpoint (the LLM and
the tower are saved beside it, in `language_model/` and `vision_model/`), or a
`Blip2ForImageTextRetrieval` directory into a stage-1 checkpoint (`convert.stage1_from_hf_retrieval`).

Legend: b batch, q queries, n image tokens (class token first), d_v tower width.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
from collections.abc import Callable
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    Blip2VisionConfig,
    Blip2VisionModel,
    CLIPImageProcessor,
    GenerationConfig,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
)
from transformers.image_utils import PILImageResampling

from qformer.checkpoint import CONFIG_NAME, CheckpointError, LoadReport, load_state_dict_strict
from qformer.convert import (
    HF_LAYER_NAMES,
    HF_STAGE2_NAMES,
    Rule,
    convert_state_dict,
    from_hf_qformer_config,
    stage1_from_hf_retrieval,
    to_hf_qformer_config,
)
from qformer.stage2 import VQA_PROMPT, Stage2Model, text_only_prefixes, unused_prefixes

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from bridges.language import LanguageBridge
    from bridges.vision import VisionBridge

MANIFEST = "qformer_export.json"
FORMAT = "qformer-hf-blip2"

# Our instruction-aware `Stage2Model`'s weights <-> transformers `InstructBlipForConditionalGeneration`.
# Unlike BLIP-2's, its Q-Former holds the word/position embeddings and the text FFN, and keeps the
# embedding LayerNorm under `embeddings.` (BLIP-2: `qformer.layernorm`).
INSTRUCTBLIP_STAGE2_NAMES: list[Rule] = [
    ("qformer.query_tokens", "query_tokens"),
    ("qformer.embeddings.word", "qformer.embeddings.word_embeddings"),
    ("qformer.embeddings.position", "qformer.embeddings.position_embeddings"),
    ("qformer.embeddings.norm", "qformer.embeddings.layernorm"),
    *[(f"qformer.layers.{{N}}.{ours}", f"qformer.encoder.layer.{{N}}.{theirs}") for ours, theirs in HF_LAYER_NAMES],
    ("ln_vision", "vision_model.post_layernorm"),
    ("proj", "language_projection"),
]

# open_clip `VisionTransformer` -> transformers `Blip2VisionModel`. Both run pre-norm blocks
# x + attn(ln_1(x)), x + mlp(ln_2(x)) on [class token; patches] + position embeddings.
OPEN_CLIP_VIT_NAMES: list[Rule] = [
    ("conv1", "embeddings.patch_embedding"),  # open_clip's has no bias; transformers' gets zeros
    ("class_embedding", "embeddings.class_embedding"),  # (d_v,) -> (1, 1, d_v)
    ("positional_embedding", "embeddings.position_embedding"),  # (n, d_v) -> (1, n, d_v)
    ("transformer.resblocks.{N}.ln_1", "encoder.layers.{N}.layer_norm1"),
    # fused q, k, v rows in the same order. transformers 5 keeps all three biases in `qkv.bias`
    # (k's part starts at zero there but loads like any weight), so the k bias carries over exactly.
    ("transformer.resblocks.{N}.attn.in_proj_weight", "encoder.layers.{N}.self_attn.qkv.weight"),
    ("transformer.resblocks.{N}.attn.in_proj_bias", "encoder.layers.{N}.self_attn.qkv.bias"),
    ("transformer.resblocks.{N}.attn.out_proj", "encoder.layers.{N}.self_attn.projection"),
    ("transformer.resblocks.{N}.ln_2", "encoder.layers.{N}.layer_norm2"),
    ("transformer.resblocks.{N}.mlp.c_fc", "encoder.layers.{N}.mlp.fc1"),
    ("transformer.resblocks.{N}.mlp.c_proj", "encoder.layers.{N}.mlp.fc2"),
]
AFTER_THE_BLOCKS = "after the blocks (pooling, final norm, projection): BLIP-2 reads block outputs"
OPEN_CLIP_SKIP = [(prefix, AFTER_THE_BLOCKS) for prefix in ("ln_post.", "proj", "attn_pool")]

# Why some common towers have no Blip2VisionModel counterpart, for the error message.
UNSUPPORTED_TOWERS = {
    "TimmModel": "a timm trunk (e.g. the EVA towers), whose blocks this export does not map",
    "CLIPVisionModel": "CLIP normalises the embeddings before the first block (pre_layrnorm)",
    "SiglipVisionModel": "SigLIP has no class token and normalises after the last block",
    "PeftModel": "a LoRA adapter sits on it: pass the bridge's `merged()` copy",
}


# ---------------------------------------------------------------------------------------------
# Vision: the tower up to the chosen block -> Blip2VisionModel
# ---------------------------------------------------------------------------------------------
def vision_tower_to_hf(vision: VisionBridge, *, layer_norm_eps: float) -> tuple[Blip2VisionConfig, dict[str, Tensor]]:
    """The bridge's tower, up to the block the Q-Former reads, as a `Blip2VisionModel`: its config
    and its weights, all but `post_layernorm` (our `ln_vision`, whose eps is `layer_norm_eps`).

    Raises ValueError naming every part of the tower that `Blip2VisionModel` cannot express.
    """
    from open_clip.transformer import VisionTransformer

    tower = vision.tower
    if vision.source == "open_clip" and isinstance(tower, VisionTransformer):
        return _open_clip_vit_to_hf(vision, layer_norm_eps)
    if vision.source == "transformers" and isinstance(tower, Blip2VisionModel):
        return _blip2_tower_to_hf(vision, layer_norm_eps)
    kind = type(tower).__name__
    why = UNSUPPORTED_TOWERS.get(kind, "its layers have no mapping onto Blip2VisionModel")
    raise ValueError(
        f"Cannot export the vision tower {vision.spec.get('name')!r} ({vision.source} {kind}) as a "
        f"transformers Blip2VisionModel: {why}. Exportable towers: open_clip VisionTransformer "
        "without ln_pre (`vision_cfg.no_ln_pre: true`, as the ShapesWorld ViT) and transformers "
        "Blip2VisionModel. Use `--format soft-prompt` for any other tower."
    )


def _activation_name(act: nn.Module) -> str | None:
    """The transformers `hidden_act` that computes `act`, or None."""
    from open_clip.transformer import QuickGELU

    if isinstance(act, QuickGELU):
        return "quick_gelu"  # x * sigmoid(1.702 x) in both libraries
    if isinstance(act, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}.get(act.approximate)
    return None


def _open_clip_vit_to_hf(vision: VisionBridge, eps: float) -> tuple[Blip2VisionConfig, dict[str, Tensor]]:
    from open_clip.transformer import LayerScale, ResidualAttentionBlock

    tower = vision.tower
    blocks = list(tower.transformer.resblocks)  # already cut after the chosen block by the bridge
    (height, width), (patch_h, patch_w) = tower.image_size, tower.patch_size
    d = tower.transformer.width

    problems: list[str] = []
    if not isinstance(tower.ln_pre, nn.Identity):
        problems.append(
            "a LayerNorm on the embeddings before the first block (`ln_pre`): Blip2VisionModel has "
            "none. Only towers built with open_clip `vision_cfg.no_ln_pre: true` export"
        )
    if height != width or patch_h != patch_w:
        problems.append(
            f"image size {(height, width)} / patch size {(patch_h, patch_w)}: Blip2VisionConfig "
            "takes one square image_size and patch_size"
        )
    num_positions = (height // patch_h) * (width // patch_w) + 1
    if tower.positional_embedding.shape[0] != num_positions:
        problems.append(
            f"{tower.positional_embedding.shape[0]} position embeddings where Blip2VisionModel has "
            f"{num_positions} (one per patch plus the class token)"
        )
    activations, norm_eps = set(), set()
    for i, block in enumerate(blocks):
        if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
            problems.append(
                f"block {i} is a {type(block).__name__} (open_clip `block_type`, `qk_norm` or "
                "`scale_*` options); only plain ResidualAttentionBlocks map onto Blip2EncoderLayer"
            )
            continue
        attn = block.attn
        if not (attn._qkv_same_embed_dim and attn.in_proj_bias is not None and attn.bias_k is None
                and not attn.add_zero_attn):  # fmt: skip
            problems.append(f"block {i}: attention is not a fused q/k/v projection with biases")
        act = _activation_name(block.mlp.gelu)
        if act is None:
            problems.append(
                f"block {i}: MLP activation {block.mlp.gelu!r} has no transformers `hidden_act` "
                "(gelu, gelu_pytorch_tanh and quick_gelu do)"
            )
        else:
            activations.add(act)
        for name in ("ln_1", "ln_2"):
            norm = getattr(block, name)
            if not isinstance(norm, nn.LayerNorm) or not norm.elementwise_affine or norm.bias is None:
                problems.append(f"block {i}: {name} is {norm!r}, not a LayerNorm with weight and bias")
            else:
                norm_eps.add(norm.eps)
    if len(activations) > 1:
        problems.append(f"the blocks mix activations {sorted(activations)}; Blip2VisionConfig has one hidden_act")
    if norm_eps and norm_eps != {eps}:
        problems.append(
            f"the blocks' LayerNorm eps {sorted(norm_eps)} differs from ln_vision's {eps} "
            "(QFormerConfig.vision_layer_norm_eps): Blip2VisionConfig has one layer_norm_eps for "
            "both, so one of them would compute differently"
        )
    if problems:
        raise ValueError(
            f"Cannot export the open_clip tower {vision.spec.get('name')!r} as a transformers "
            "Blip2VisionModel:\n  - " + "\n  - ".join(problems) + "\nUse `--format soft-prompt` for this tower."
        )

    state = {k: v.detach().float().clone() for k, v in tower.state_dict().items()}
    for i, block in enumerate(blocks):
        for scale, linear in (("ls_1", "attn.out_proj"), ("ls_2", "mlp.c_proj")):
            if isinstance(getattr(block, scale), LayerScale):
                # gamma * (W x + b) = (gamma W) x + gamma b: fold the scale into the linear before it
                gamma = state.pop(f"transformer.resblocks.{i}.{scale}.gamma")
                state[f"transformer.resblocks.{i}.{linear}.weight"] *= gamma[:, None]
                state[f"transformer.resblocks.{i}.{linear}.bias"] *= gamma
    converted = convert_state_dict(state, OPEN_CLIP_VIT_NAMES, skip=OPEN_CLIP_SKIP)
    if converted.unmatched:
        raise ValueError(
            f"Cannot export the open_clip tower {vision.spec.get('name')!r}: its weights "
            f"{converted.unmatched} have no place in Blip2VisionModel."
        )
    theirs = converted.state_dict
    theirs["embeddings.class_embedding"] = theirs["embeddings.class_embedding"].reshape(1, 1, d)
    theirs["embeddings.position_embedding"] = theirs["embeddings.position_embedding"].unsqueeze(0)  # (1, n, d_v)
    theirs["embeddings.patch_embedding.bias"] = torch.zeros(d)
    config = Blip2VisionConfig(
        hidden_size=d,
        intermediate_size=blocks[0].mlp.c_fc.out_features,
        num_hidden_layers=len(blocks),
        num_attention_heads=blocks[0].attn.num_heads,
        image_size=height,
        patch_size=patch_h,
        hidden_act=activations.pop(),
        layer_norm_eps=eps,
        attention_dropout=0.0,
        qkv_bias=True,
    )
    return config, theirs


def _blip2_tower_to_hf(vision: VisionBridge, eps: float) -> tuple[Blip2VisionConfig, dict[str, Tensor]]:
    """A transformers Blip2VisionModel (e.g. one `import_hf_blip2` saved): its blocks up to the
    chosen one; its own post_layernorm gives way to our `ln_vision`."""
    tower = vision.tower
    problems = []
    if tower.config.layer_norm_eps != eps:
        problems.append(
            f"the tower's layer_norm_eps {tower.config.layer_norm_eps} differs from ln_vision's {eps} "
            "(QFormerConfig.vision_layer_norm_eps); Blip2VisionConfig has one eps for both"
        )
    if tower.config.image_size != vision.image_size:
        problems.append(
            f"the tower is built for {tower.config.image_size} px images but its image processor "
            f"makes {vision.image_size} px ones"
        )
    if problems:
        raise ValueError(
            f"Cannot export the Blip2VisionModel {vision.spec.get('name')!r}:\n  - " + "\n  - ".join(problems)
        )
    layer = re.compile(r"encoder\.layers\.(\d+)\.")
    state = {}
    for key, value in tower.state_dict().items():
        match = layer.match(key)
        if key.startswith("post_layernorm.") or (match and int(match[1]) > vision.block):
            continue  # blocks after the chosen one stay behind, if the bridge kept them
        state[key] = value.detach().float().clone()
    config = copy.deepcopy(tower.config)
    config.num_hidden_layers = vision.block + 1
    return config, state


def image_processor_for(vision: VisionBridge) -> CLIPImageProcessor:
    """A transformers image processor computing `vision.eval_transform()`: RGB (transparency on
    white), shorter side to S (bicubic), centre crop S x S, [0, 1], mean/std.

    Loaded with `backend="pil"` it gives the same pixels bit for bit; the default torchvision
    backend resizes with its own bicubic, up to one 8-bit level away on resized images.
    """
    side = vision.image_size
    return CLIPImageProcessor(
        do_convert_rgb=True,
        do_resize=True,
        size={"shortest_edge": side},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": side, "width": side},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(vision.mean),
        image_std=list(vision.std),
    )


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
def export_hf_blip2(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the stage-2 checkpoint in `checkpoint` as a transformers BLIP-2 directory `out`
    (model, processor, generation config, `qformer_export.json`); an instruction-aware checkpoint
    as InstructBLIP (`InstructBlipForConditionalGeneration`, `InstructBlipProcessor`). LoRA
    adapters on the LLM or the tower are added into their weights: transformers' BLIP-2 has no
    place for an adapter."""
    config = _stage2_config(checkpoint)
    if not config.get("vision"):
        raise CheckpointError(
            f"{checkpoint}/{CONFIG_NAME} names no vision tower (`vision` is null: trained on cached "
            "tokens). Blip2ForConditionalGeneration holds the tower: save the checkpoint with the "
            "tower's spec, `model.save_pretrained(dir, vision_spec={...})`."
        )
    model = Stage2Model.from_pretrained(checkpoint).eval()
    merged = [name for name, bridge in (("llm", model.language), ("vision", model.vision)) if bridge.lora is not None]
    hf, processor, row_added = to_hf_blip2(model, vision=model.vision.merged(), language=model.language.merged())

    out = Path(out)
    hf.save_pretrained(out)
    processor.save_pretrained(out)
    manifest = {
        "format": FORMAT,
        "architecture": type(hf).__name__,
        # InstructBLIP: the Q-Former reads the prompt too (the processor's `text`, "" for none),
        # its ids padded on the right (see the module docstring)
        "instruction_aware": model.instruction_aware,
        "qformer_padding_side": "right" if model.instruction_aware else None,
        "source": str(Path(checkpoint).resolve()),
        "prompt": model.prompt,  # pass it as `text=` to the processor ("" when None)
        "vqa_template": model.vqa_template,
        "end_of_text": model.language.end_of_text,
        "llm": model.language.name,
        "vision": model.vision.spec,
        "lora_merged": merged,  # the bridges whose LoRA adapter was added into the weights
        "image_token_index": hf.config.image_token_index,
        # the LLM's embedding table had no free row for the placeholder: one was added (zeros) and
        # `generation_config.suppress_tokens` keeps it from being generated
        "placeholder_row_added": row_added,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _stage2_config(checkpoint: str | Path) -> dict[str, Any]:
    """`config.json` of a stage-2 checkpoint; anything else fails with what it is instead."""
    path = Path(checkpoint) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: --checkpoint must be a stage-2 model directory (config.json + "
            "model.safetensors, as the stage-2 recipe writes to OUTPUT_DIR/model)."
        )
    config = json.loads(path.read_text())
    kind = config.get("kind")
    if kind != Stage2Model.KIND:
        if kind:
            what = f"a {kind!r} checkpoint"
        elif "model_type" in config:
            what = f"a transformers {config['model_type']!r} model, not a qformer checkpoint"
        else:
            what = "not a qformer checkpoint (its config.json has no `kind`)"
        raise CheckpointError(
            f"{checkpoint} is {what}; exporting to Blip2ForConditionalGeneration needs a stage-2 "
            f"checkpoint ({Stage2Model.KIND!r}: Q-Former, projection and LLM), as the stage-2 recipe writes it."
        )
    return config


def to_hf_blip2(
    model: Stage2Model, *, vision: VisionBridge, language: LanguageBridge
) -> tuple[
    Blip2ForConditionalGeneration | InstructBlipForConditionalGeneration, Blip2Processor | InstructBlipProcessor, bool
]:
    """The transformers model and processor of `model` with these bridges (without LoRA
    adapters: pass `model.vision.merged()`, `model.language.merged()`), and whether a row for the
    image placeholder was added to the LLM's embedding table. An instruction-aware model becomes
    `InstructBlipForConditionalGeneration` with an `InstructBlipProcessor`.

    Raises ValueError naming what transformers cannot express. Takes over `language.model`: the
    transformers model holds that LLM (no copy), whose embedding table may grow by that row.
    """
    vision_config, vision_state = vision_tower_to_hf(vision, layer_norm_eps=model.config.vision_layer_norm_eps)
    llm = language.model
    if llm.config.hidden_size != language.hidden_size:
        raise ValueError(
            f"{language.name} reads {language.hidden_size}-wide input embeddings but its hidden_size is "
            f"{llm.config.hidden_size} (e.g. OPT-350m's word_embed_proj_dim): Blip2ForConditionalGeneration "
            "projects the queries to text_config.hidden_size, so it cannot hold this LLM. Use "
            "`--format soft-prompt`."
        )

    # step 1: the processor, with the image placeholder added to a copy of the LLM's tokenizer
    tokenizer = copy.deepcopy(language.tokenizer)
    if not language.is_encoder_decoder:
        # batched generation needs every row's next token at the end. save_pretrained writes
        # `init_kwargs`, not the attribute, so set both.
        tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"
    num_queries = model.config.num_query_tokens
    if model.instruction_aware:
        qformer_tokenizer = copy.deepcopy(model.qformer_tokenizer)
        qformer_tokenizer.padding_side = qformer_tokenizer.init_kwargs["padding_side"] = "right"
        processor = InstructBlipProcessor(
            image_processor_for(vision), tokenizer, qformer_tokenizer, num_query_tokens=num_queries
        )
    else:
        processor = Blip2Processor(image_processor_for(vision), tokenizer, num_query_tokens=num_queries)
    image_token_id = tokenizer.convert_tokens_to_ids(str(processor.image_token))

    # step 2: an embedding row for the placeholder. Its input embedding is always replaced by the
    # image, so only the output side sees the row. One we add is zero (its logit is exactly 0 where
    # the head has no bias) and the generation config suppresses it.
    row_added = image_token_id >= llm.get_input_embeddings().num_embeddings
    if row_added:
        _add_zero_rows(llm, image_token_id + 1)

    # step 3: the config. The LLM's generate reads its end of text from the text config.
    text_config = copy.deepcopy(llm.config)
    text_config.eos_token_id = language.end_token_id
    text_config.pad_token_id = language.pad_token_id
    qformer_config = to_hf_qformer_config(model.config)
    qformer_config.use_qformer_text_input = False  # stage 2 runs the query path only
    parts = {
        "text_config": text_config.to_dict(),
        "num_query_tokens": num_queries,
        "image_token_index": image_token_id,
        "initializer_range": model.config.initializer_range,
    }
    if model.instruction_aware:
        config = InstructBlipConfig(
            vision_config=_as_config(InstructBlipVisionConfig, vision_config),
            qformer_config=_as_config(InstructBlipQFormerConfig, qformer_config),
            **parts,
        )
    else:
        config = Blip2Config(vision_config=vision_config.to_dict(), qformer_config=qformer_config.to_dict(), **parts)

    # step 4: the weights. Built on the meta device so the LLM is never allocated twice; the real
    # LLM goes in as it is and every other tensor is assigned from ours.
    names = INSTRUCTBLIP_STAGE2_NAMES if model.instruction_aware else HF_STAGE2_NAMES
    ours = convert_state_dict(_stage2_weights(model), names)
    assert not ours.unmatched, f"keys of ours missing from the name table: {ours.unmatched}"
    state = {f"vision_model.{k}": v for k, v in vision_state.items()}
    state |= {k: v.detach().float().clone() for k, v in ours.state_dict.items()}
    model_class = InstructBlipForConditionalGeneration if model.instruction_aware else Blip2ForConditionalGeneration
    with torch.device("meta"):
        hf = model_class(config)
    hf.language_model = llm
    result = hf.load_state_dict(state, strict=False, assign=True)
    if model.instruction_aware:  # a buffer that is not saved, so nothing above assigned it
        positions = torch.arange(model.config.max_position_embeddings)
        hf.qformer.embeddings.position_ids = positions.expand((1, -1))  # (1, max_position_embeddings)
    missing = [k for k in result.missing_keys if not k.startswith("language_model.")]
    on_meta = [n for n, t in chain(hf.named_parameters(), hf.named_buffers()) if t.is_meta]
    if missing or result.unexpected_keys or on_meta:
        raise CheckpointError(
            f"The transformers {model_class.__name__} does not take our weights exactly: "
            f"missing {missing or on_meta}, unexpected {result.unexpected_keys}. The name tables in "
            "qformer/convert.py (HF_STAGE2_NAMES) and qformer/hf_blip2.py (INSTRUCTBLIP_STAGE2_NAMES) "
            "need updating for this transformers version."
        )
    hf.generation_config = _generation_config(language, suppress=image_token_id if row_added else None)
    return hf.eval(), processor, row_added


def _stage2_weights(model: Stage2Model) -> dict[str, Tensor]:
    """The weights transformers' model needs of ours: the trainable ones outside the bridges, and
    for InstructBLIP also the last layer's text FFN. That one is frozen and not saved (its outputs
    reach nothing), but transformers computes it and drops the result; it is written as zero
    dense layers and an identity LayerNorm so that the export does not depend on a random init."""
    weights = dict(model.trainable_state_dict(adapters=False))
    if model.instruction_aware:
        for prefix in unused_prefixes(model.config, instruction_aware=True):
            module = model.get_submodule(prefix.rstrip("."))
            for name, tensor in module.state_dict().items():
                fill = torch.ones_like if name == "norm.weight" else torch.zeros_like
                weights[prefix + name] = fill(tensor)
    return weights


def _as_config(config_class: type, config: Any) -> Any:
    """`config` (a BLIP-2 sub-config) as `config_class`: the fields the InstructBLIP class has."""
    defaults = config_class().to_dict()
    skip = {"model_type", "transformers_version", "architectures"}
    return config_class(**{k: v for k, v in config.to_dict().items() if k in defaults and k not in skip})


def _add_zero_rows(llm: PreTrainedModel, num_rows: int) -> None:
    """Grow the LLM's token embeddings (input and output) to `num_rows`, the new rows zero."""
    old = llm.get_input_embeddings().num_embeddings
    llm.resize_token_embeddings(num_rows, mean_resizing=False)
    with torch.no_grad():
        llm.get_input_embeddings().weight[old:] = 0
        output = llm.get_output_embeddings()
        if output is not None:  # the same tensor when tied
            output.weight[old:] = 0
            if getattr(output, "bias", None) is not None:
                output.bias[old:] = 0


def _generation_config(language: LanguageBridge, *, suppress: int | None) -> GenerationConfig:
    """The LLM's own generation config with `LanguageBridge.generate`'s settings on top, which is
    what `qformer caption` decodes with."""
    from bridges.language import LanguageBridge

    # read from the signature, so that the two cannot drift apart
    defaults = inspect.signature(LanguageBridge.generate).parameters
    settings = ("num_beams", "max_new_tokens", "min_new_tokens", "do_sample", "repetition_penalty", "length_penalty")
    config = copy.deepcopy(language.model.generation_config)
    config.update(
        **{name: defaults[name].default for name in settings},
        eos_token_id=language.end_token_id,
        pad_token_id=language.pad_token_id,
    )
    if suppress is not None:
        config.suppress_tokens = [*(config.suppress_tokens or []), suppress]
    config._from_model_config = False  # written on purpose: transformers must not rebuild it from the model config
    return config


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------
def import_hf_blip2(src: str | Path, out: str | Path) -> tuple[str, LoadReport]:
    """Convert a transformers BLIP-2 directory (or hub name) into our checkpoint in `out`:
    `Blip2ForConditionalGeneration` -> stage 2, `Blip2ForImageTextRetrieval` -> stage 1.

    Returns which was written ("stage-2" or "stage-1") and the load report.
    """
    config = _blip2_config(src)
    architectures = config.architectures or []
    if "Blip2ForConditionalGeneration" in architectures:
        return "stage-2", _import_stage2(src, Path(out))
    if "Blip2ForImageTextRetrieval" in architectures:
        return "stage-1", _import_stage1(src, Path(out))
    raise ValueError(
        f"{src} holds a BLIP-2 {' / '.join(architectures) or 'model without `architectures`'}; import "
        "reads Blip2ForConditionalGeneration (into a stage-2 checkpoint) or Blip2ForImageTextRetrieval "
        "(into a stage-1 checkpoint). Save the model as one of these."
    )


def _blip2_config(src: str | Path) -> Blip2Config:
    """The `Blip2Config` of `src`; anything else fails naming what `src` is."""
    path = Path(src)
    if path.is_file():
        raise ValueError(
            f"{src} is a file; --from hf-blip2 reads a transformers model directory (config.json and "
            "weights, as save_pretrained writes them) or a hub name. For a LAVIS checkpoint file use --from lavis."
        )
    if path.is_dir():
        config_path = path / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{config_path} not found: {src} is not a transformers model directory "
                "(save_pretrained writes config.json)."
            )
        raw = json.loads(config_path.read_text())
        if raw.get("model_type") == "instructblip":
            raise ValueError(
                f"{src} holds an InstructBLIP model: `qformer import --from hf-blip2` reads BLIP-2 "
                "(Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval) only; importing InstructBLIP "
                "is not supported yet. Keep the instruction-aware stage-2 checkpoint it was exported from."
            )
        if "kind" in raw:
            raise ValueError(
                f"{src} is already one of our checkpoints ({raw['kind']!r}); --from hf-blip2 converts "
                "transformers BLIP-2 directories (e.g. from `qformer export --format hf-blip2`)."
            )
        if raw.get("model_type") != "blip-2":
            architectures = ", ".join(raw.get("architectures") or []) or "no architectures named"
            raise ValueError(
                f"{src} holds a {raw.get('model_type')!r} model ({architectures}), not BLIP-2 "
                "(model_type 'blip-2'): --from hf-blip2 reads Blip2ForConditionalGeneration or "
                "Blip2ForImageTextRetrieval directories."
            )
    try:
        config = AutoConfig.from_pretrained(src)
    except OSError as error:  # not a directory, and not a hub name that can be reached
        raise FileNotFoundError(
            f"{src}: no such directory, and no hub model of that name could be loaded ({error})."
        ) from error
    if not isinstance(config, Blip2Config):
        raise ValueError(f"{src} holds a {config.model_type!r} model, not BLIP-2 (model_type 'blip-2').")
    return config


def _import_stage2(src: str | Path, out: Path) -> LoadReport:
    """A stage-2 checkpoint in `out` from a Blip2ForConditionalGeneration, with its LLM saved in
    `out/language_model` and its tower (all blocks, read at the last one) in `out/vision_model`."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from bridges.language import LanguageBridge

    out = out.resolve()  # the specs hold absolute paths, as the bridges' own specs do
    manifest = _read_manifest(src)
    hf = Blip2ForConditionalGeneration.from_pretrained(src).eval()
    tokenizer = _load_part(AutoTokenizer.from_pretrained, src, "tokenizer")
    image_processor = _load_part(AutoImageProcessor.from_pretrained, src, "image processor (preprocessor_config.json)")

    vision_config = hf.config.vision_config
    qformer_config = from_hf_qformer_config(
        hf.config.qformer_config,
        num_query_tokens=hf.config.num_query_tokens,
        vision_layer_norm_eps=vision_config.layer_norm_eps,
        meta={"converted_from": f"Blip2ForConditionalGeneration {src}"},
    )
    if qformer_config.vision_width != vision_config.hidden_size:
        raise CheckpointError(
            f"{src}: the Q-Former reads {qformer_config.vision_width}-wide tokens (encoder_hidden_size) "
            f"but the vision tower gives {vision_config.hidden_size}-wide ones."
        )
    llm_dir, vision_dir = out / "language_model", out / "vision_model"
    end_of_text = manifest.get("end_of_text") or _end_of_text(hf.config.text_config, tokenizer, src)
    language = LanguageBridge(hf.language_model, tokenizer, name=str(llm_dir), end_of_text=end_of_text)
    model = Stage2Model(
        qformer_config,
        language=language,
        prompt=manifest.get("prompt"),
        vqa_template=manifest.get("vqa_template") or VQA_PROMPT,
    )
    theirs = {k: v for k, v in hf.state_dict().items() if not k.startswith("language_model.")}
    skip = [("vision_model.", f"frozen vision tower: saved in {vision_dir}")]
    converted = convert_state_dict(theirs, HF_STAGE2_NAMES, reverse=True, skip=skip)
    if converted.unmatched:
        raise CheckpointError(
            f"{src}: {converted.unmatched} have no place in our stage-2 model (convert.HF_STAGE2_NAMES)."
        )
    # a Q-Former saved with use_qformer_text_input=True also has the text FFN, which stage 2 never runs
    text_only = {k for k in converted.state_dict if k.startswith(text_only_prefixes(qformer_config))}
    weights = {k: v for k, v in converted.state_dict.items() if k not in text_only}
    report = load_state_dict_strict(model.trainable_state_dict(), weights, source=str(src))
    report.skipped.update(converted.skipped)
    report.skipped |= {converted.source_names[k]: "Q-Former text FFN: unused in stage 2" for k in text_only}
    report.skipped |= {k: f"frozen LLM: saved in {llm_dir}" for k in hf.state_dict() if k.startswith("language_model.")}

    # the LLM decodes with the exported settings (and keeps a suppressed placeholder suppressed)
    hf.language_model.generation_config = copy.deepcopy(hf.generation_config)
    hf.language_model.save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    hf.vision_model.save_pretrained(vision_dir)
    image_processor.save_pretrained(vision_dir)
    # the saved tower ends at the block the Q-Former reads: the bridge takes its last one (-1)
    vision_spec = {"source": "transformers", "name": str(vision_dir), "pretrained": None, "layer": -1}
    model.save_pretrained(out, vision_spec=vision_spec)
    return report


def _import_stage1(src: str | Path, out: Path) -> LoadReport:
    """A stage-1 checkpoint in `out` from a Blip2ForImageTextRetrieval that describes itself as a
    stage-1 run's does: its tokenizer (with `[DEC]`) in `out/tokenizer`, its tower in
    `out/vision_model`, so that retrieval evaluation and `init_from` take it as it is."""
    from transformers import AutoImageProcessor

    from qformer.bert_init import check_tokenizer_fits, load_tokenizer

    out = out.resolve()  # the tower's spec holds an absolute path, as the bridges' own specs do
    hf = Blip2ForImageTextRetrieval.from_pretrained(src).eval()
    image_processor = _load_part(AutoImageProcessor.from_pretrained, src, "image processor (preprocessor_config.json)", "stage-1")
    tokenizer = _load_part(load_tokenizer, src, "BERT tokenizer", "stage-1")
    model, report = stage1_from_hf_retrieval(hf)
    check_tokenizer_fits(tokenizer, model.config, str(src))
    vision_dir = out / "vision_model"
    hf.vision_model.save_pretrained(vision_dir)
    image_processor.save_pretrained(vision_dir)
    tokenizer.save_pretrained(out / "tokenizer")
    tower = [k for k in report.skipped if k.startswith("vision_model.")]
    report.skipped |= {k: f"frozen vision tower: saved in {vision_dir}" for k in tower}
    # the saved tower ends at the block the Q-Former reads: the bridge takes its last one (-1)
    vision_spec = {"source": "transformers", "name": str(vision_dir), "pretrained": None, "layer": -1}
    model.save_pretrained(out, extra={"vision": vision_spec})
    return report


def _read_manifest(src: str | Path) -> dict[str, Any]:
    """`qformer_export.json` when `src` came from our export, else {}."""
    path = Path(src) / MANIFEST
    if not path.is_file():
        return {}
    manifest = json.loads(path.read_text())
    return manifest if manifest.get("format") == FORMAT else {}


def _load_part(load: Callable[[Any], Any], src: str | Path, what: str, kind: str = "stage-2") -> Any:
    """`load(src)`, failing with what is missing and how to save it."""
    try:
        return load(src)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"{src} has no usable {what}: a {kind} checkpoint needs it. Save the Blip2Processor beside "
            f"the model (`processor.save_pretrained(dir)`). ({error})"
        ) from error


def _end_of_text(text_config: Any, tokenizer: PreTrainedTokenizerBase, src: str | Path) -> str:
    """Our `end_of_text` for the LLM's configured EOS: "newline" when it is the "\\n" token."""
    eos = text_config.eos_token_id
    if isinstance(eos, list) and len(eos) == 1:
        eos = eos[0]
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    if len(newline) == 1 and eos == newline[0]:
        return "newline"
    if eos is not None and eos == tokenizer.eos_token_id:
        return "eos"
    raise ValueError(
        f"{src}: text_config.eos_token_id={eos} is neither the tokenizer's EOS token "
        f'({tokenizer.eos_token_id}) nor its "\\n" token, so where generated text ends is unclear. '
        "Set text_config.eos_token_id to one of them."
    )
