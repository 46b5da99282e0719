"""Tiny frozen backbones for ShapesWorld, trained here because none can be downloaded.

BLIP-2 needs a frozen image encoder and a frozen language model. For ShapesWorld we train our own,
in minutes on a CPU, and save them in their libraries' own formats so that the project's bridges
load them exactly as they would load a downloaded backbone:

    paths = ensure_backbones("simple")                       # trains once, then reuses the cache
    # paths["bert_dir"]: the BERT, for Stage1Settings(bert=...) / bert_init.init_from_bert
    open_clip.add_model_config(paths["vit_config"])          # ensure_backbones already did this
    vision = VisionBridge.from_open_clip(paths["vit_name"], paths["vit_weights"])
    language = LanguageBridge.from_pretrained(paths["llm_dir"])

* The image encoder is an open_clip CLIP with a tiny ViT (no pre-LN, GELU, so transformers' BLIP-2
  vision layout can express it) and a tiny text tower, trained contrastively with open_clip's
  `ClipLoss` on (image, caption) pairs of a world generated into the cache. It reads 63x63 images
  in 21x21 patches, one token per cell of the world's 3x3 layout, so each object sits (almost)
  whole in one token. Its position embedding is initialised 8x larger than open_clip's default:
  with the default a tiny ViT trained for minutes on plain backgrounds never learns where things
  are.
* The language model is a tiny OPT (or T5) trained on conditional texts ("scene : <attribute
  words, padded with a filler to `num_queries`> . caption : ..." and "... question : ... answer :
  ..."), loss only after the scene slot. A tiny LM trained on bare captions cannot be steered by a
  soft prompt once frozen; one trained to read a scene slot can: in stage 2 the Q-Former's soft
  prompt takes the place of the scene words. The full world's slot holds one position per object
  instead, the sum of its words' embeddings (`train_world_lm(slot="objects")`).
* The BERT is a tiny `BertForPreTraining` trained on the world's text with BERT's two tasks
  (masked words; "is the second text about the same scene?" from [CLS]), saved with a word-level
  tokenizer: the world's stand-in for the bert-base that BLIP-2 starts its Q-Former from.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from qformer.optim import adamw
from qformer.world import shapes

# v2: the fused AdamW (`qformer.optim.adamw`), whose rounding differs from v1's loop
VERSION = "backbones-v2"
LMKind = Literal["opt", "t5"]
# How the LM's scene slot holds a scene: "words", one attribute word per position (padded with the
# filler); "objects", one position per object holding the sum of its words' embeddings.
SlotLayout = Literal["words", "objects"]
# open_clip's defaults for a registered config loaded from a weights file (OPENAI_DATASET_MEAN/STD):
# `create_model(name, pretrained=file)` sets exactly these as the model's preprocess settings, so
# the bridge normalises images the way the ViT was trained.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
POS_EMBED_SCALE = 8.0
DEFAULT_FILLER = "none"
DEFAULT_LM_STEPS = {"opt": 1500, "t5": 1000}


def _log(msg: str) -> None:
    print(f"[backbones] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# Tokenizers


def world_tokenizer(texts: Iterable[str], kind: LMKind) -> PreTrainedTokenizerFast:
    """A small tokenizer trained on `texts` (the world's texts, or just its vocabulary words),
    shaped like the real family's:

    "opt": byte-level BPE (GPT-2 style, "Ġ" marks a space, "\\n" is the single token "Ċ"), special
        tokens <s> <pad> </s> <unk> at ids 0-3, "</s>" as BOS and EOS, BOS prepended to every text.
    "t5": Unigram with "▁" word starts; <pad>=0, </s>=1, <unk>=2; "</s>" appended, no BOS.
    """
    texts = list(texts)
    if kind == "opt":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=2000,  # far more than needed: every world word becomes one token
            special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
        )
    if kind == "t5":
        # BPE rather than T5's Unigram: on a corpus this small the Unigram trainer keeps mostly
        # single characters, which makes sequences three times longer; what matters to the
        # bridges (pad 0, EOS appended, no BOS, "▁" word starts) is the same.
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False)
        tok.train_from_iterator(texts, trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
        )
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    raise ValueError(f'`kind` must be "opt" or "t5", got {kind!r}')


BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def bert_word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A BERT-style tokenizer with one token per word of `texts` (uncased, [CLS] ... [SEP]), plus
    common punctuation: the Q-Former's embedding and LM head then are as small as the world. A real
    run uses bert-base-uncased."""
    from tokenizers import normalizers

    split = pre_tokenizers.BertPreTokenizer()
    words = {w for text in texts for w, _ in split.pre_tokenize_str(text.lower())}
    vocab = {w: i for i, w in enumerate([*BERT_SPECIALS, *sorted(words | set(",.?!-:;'\"()"))])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = split
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Helpers


def _progress(step: int, steps: int, start: float, budget: float | None) -> float:
    """Fraction of training done: by steps, or by time when a budget runs out first."""
    p = step / steps
    if budget:
        p = max(p, (time.perf_counter() - start) / budget)
    return min(p, 1.0)


def _lr_at(progress: float, lr: float, warmup: float = 0.05) -> float:
    if progress < warmup:
        return lr * (progress / warmup + 1e-3)
    return lr * 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup)))


_WORD = re.compile(r"[a-z]+|[^\sa-z]")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


# ----------------------------------------------------------------------------------------------
# ViT (open_clip CLIP)


def _vit_config(*, image_size: int, patch_size: int, width: int, layers: int, heads: int, embed_dim: int,
                vocab_size: int, context_length: int, text_width: int, text_layers: int) -> dict[str, Any]:  # fmt: skip
    return {
        "embed_dim": embed_dim,
        "quick_gelu": False,
        "vision_cfg": {
            "image_size": image_size,
            "patch_size": patch_size,
            "width": width,
            "layers": layers,
            "head_width": width // heads,
            "mlp_ratio": 4.0,
            "no_ln_pre": True,
        },
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": vocab_size,
            "width": text_width,
            "heads": max(1, text_width // 32),
            "layers": text_layers,
            "pad_id": 0,
            "eos_id": vocab_size - 1,
        },
    }


def register_vit_config(config_path: str | Path) -> str:
    """Register an open_clip model config file (its name is the file's stem); idempotent."""
    import open_clip

    path = Path(config_path)
    if path.stem not in open_clip.list_models():
        open_clip.add_model_config(path)
    return path.stem


def create_world_clip(model_name: str, *, scale_pos_embed: bool = True) -> torch.nn.Module:
    """An untrained CLIP of a registered config, its ViT position embedding scaled 8x."""
    import open_clip

    model = open_clip.create_model(model_name)
    if scale_pos_embed:
        with torch.no_grad():
            model.visual.positional_embedding.mul_(POS_EMBED_SCALE)
    return model


class _CaptionIds:
    """Word-level ids for the CLIP text tower: 0 pad, 1..V-3 words (2 unk), V-2 start, V-1 end
    (open_clip's text tower pools at the largest id, its end of text)."""

    def __init__(self, words: Sequence[str], context_length: int):
        self.words = ["<pad>", "<unk>", *sorted(set(words))]
        self.index = {w: i for i, w in enumerate(self.words)}
        self.sot, self.eot = len(self.words), len(self.words) + 1
        self.vocab_size = len(self.words) + 2
        self.context_length = context_length

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.sot] + [self.index.get(w, 1) for w in _words(text)][: self.context_length - 2] + [self.eot]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def world_transform(image_size: int) -> Callable[[Any], torch.Tensor]:
    """PIL image -> the world ViT's input tensor (`bridges.vision.eval_transform` with the world's
    mean and std): the one transform of its training, its evaluation and the demo's."""
    from bridges.vision import eval_transform

    return eval_transform(image_size, IMAGE_MEAN, IMAGE_STD)


def _load_images(world_dir: Path, records: Sequence[dict[str, Any]], image_size: int) -> torch.Tensor:
    from PIL import Image

    info = json.loads((world_dir / "world.json").read_text())
    if not info.get("images_written", True):
        raise ValueError(
            f"the world in {world_dir} was generated without its images (`write_images=False`): generate it "
            "again with `write_images=True`, or pass its images to `train_world_vit(images=...)`"
        )
    transform = world_transform(image_size)
    return torch.stack([transform(Image.open(world_dir / r["image"])) for r in records])


def epoch_order(n: int, generator: torch.Generator, *, paired: bool = False) -> torch.Tensor:
    """A random order of `n` items; `paired`: of the pairs (2k, 2k + 1), each pair kept adjacent at
    an even offset, so that a batch of even size holds both or neither (shape twins)."""
    from qformer.data import paired_permutation

    return paired_permutation(n, generator) if paired else torch.randperm(n, generator=generator)


def train_world_vit(
    world_dir: str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    steps: int = 600,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    image_size: int = 64,
    patch_size: int = 8,
    width: int = 96,
    layers: int = 4,
    heads: int = 3,
    embed_dim: int = 64,
    text_width: int = 64,
    text_layers: int = 2,
    context_length: int = 48,
    time_budget_s: float | None = None,
    log_every: int = 50,
    model_name: str | None = None,
    on_step: Callable[[], None] | None = None,
    images: torch.Tensor | None = None,
) -> tuple[str, str]:
    """Train a tiny open_clip CLIP on the (image, caption) pairs of the world in `world_dir` and
    save it to `out_dir` as `<name>.json` (the open_clip config, registered) and
    `<name>.safetensors` (the whole CLIP state dict). Returns (model_name, weights_path), the
    arguments of `VisionBridge.from_open_clip`. `on_step` is called before every step (the demo
    hands this process its threads back there once the text models trained beside it are done).
    A world written with `twins=True` is shuffled in pairs, so each batch holds every scene beside
    its shape twin: with open_clip's loss unchanged, shape is then what tells most pairs apart.
    `images`: the training split's images as `world_transform(image_size)` makes them, one per
    record in order (default: read from the world's PNGs)."""
    from open_clip.loss import ClipLoss
    from safetensors.torch import save_file

    world_dir, out_dir = Path(world_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = shapes.load_split(world_dir, "train")
    captions = [r["caption"] for r in train]
    world = json.loads((world_dir / "world.json").read_text())
    vocab = world["vocabulary"]
    paired = bool(world.get("twins"))
    if paired and batch_size % 2:
        raise ValueError(
            f"{world_dir} holds shape twins, trained in pairs: `batch_size` must be even, got {batch_size}"
        )
    words = {w for t in captions for w in _words(t)}
    words |= {w for values in vocab.values() for v in values for w in _words(str(v))}
    text_ids = _CaptionIds(sorted(words), context_length)

    config = _vit_config(
        image_size=image_size, patch_size=patch_size, width=width, layers=layers, heads=heads, embed_dim=embed_dim,
        vocab_size=text_ids.vocab_size, context_length=context_length, text_width=text_width,
        text_layers=text_layers,
    )  # fmt: skip
    if model_name is None:
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode() + str(seed).encode()).hexdigest()
        model_name = f"shapesworld-vit-{digest[:10]}"
    config_path = out_dir / f"{model_name}.json"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    register_vit_config(config_path)

    if images is None:
        images = _load_images(world_dir, train, image_size)
    elif tuple(images.shape) != (len(train), 3, image_size, image_size):
        raise ValueError(
            f"`images` must hold the {len(train)} training images of {world_dir} as (N, 3, {image_size}, "
            f"{image_size}) tensors (`world_transform({image_size})`), got shape {tuple(images.shape)}"
        )
    torch.manual_seed(seed)
    model = create_world_clip(model_name)
    tokens = text_ids(captions)
    n = len(train)

    decay = [p for name, p in model.named_parameters() if p.ndim >= 2 and "positional_embedding" not in name]
    no_decay = [p for name, p in model.named_parameters() if not (p.ndim >= 2 and "positional_embedding" not in name)]
    optimizer = adamw(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr,
        betas=(0.9, 0.98), eps=1e-6,
    )  # fmt: skip
    loss_fn = ClipLoss()
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    step, order, cursor = 0, epoch_order(n, generator, paired=paired), 0
    losses: list[float] = []
    while step < steps:
        progress = _progress(step, steps, start, time_budget_s)
        if progress >= 1.0:
            break
        if on_step is not None:
            on_step()
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(progress, lr)
        if cursor + batch_size > n:
            order, cursor = epoch_order(n, generator, paired=paired), 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        image_features, text_features, logit_scale = model(images[idx], tokens[idx])[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        losses.append(loss.item())
        if step % log_every == 0 or step == 1:
            _log(f"vit step {step}/{steps} loss {loss.item():.4f} lr {optimizer.param_groups[0]['lr']:.2e} "
                 f"{time.perf_counter() - start:.0f}s")  # fmt: skip
    seconds = time.perf_counter() - start
    _log(f"vit trained {step} steps in {seconds:.1f}s, final loss {losses[-1] if losses else float('nan'):.4f}")

    weights_path = out_dir / f"{model_name}.safetensors"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights_path))
    info = {
        "model_name": model_name,
        "mean": IMAGE_MEAN,
        "std": IMAGE_STD,
        "pos_embed_scale": POS_EMBED_SCALE,
        "steps_done": step,
        "steps": steps,
        "seconds": seconds,
        "final_loss": losses[-1] if losses else None,
        "text_words": text_ids.words,
        "seed": seed,
    }
    (out_dir / "vit_train_info.txt").write_text(json.dumps(info, indent=2) + "\n")
    return model_name, str(weights_path)


@torch.no_grad()
def evaluate_world_vit(model_name: str, weights_path: str | Path, world_dir: str | Path,
                       split: str = "test") -> dict[str, float]:  # fmt: skip
    """Image->text and text->image retrieval R@1 on `split` by cosine similarity of the CLIP
    embeddings; a hit is an item of the same scene. Texts are the first reference caption of each
    item. Also zero-shot accuracy of single attributes (one-object scenes only), each by picking
    the best of the prompts "a <value> shape" / "a <value> object" / "a shape <position phrase>"."""
    import open_clip

    world_dir = Path(world_dir)
    info = json.loads((Path(weights_path).parent / "vit_train_info.txt").read_text())
    model = open_clip.create_model(model_name, pretrained=str(weights_path)).eval()
    cfg = open_clip.get_model_config(model_name)
    text_ids = _CaptionIds([], cfg["text_cfg"]["context_length"])
    text_ids.words = info["text_words"]
    text_ids.index = {w: i for i, w in enumerate(text_ids.words)}
    text_ids.sot, text_ids.eot = len(text_ids.words), len(text_ids.words) + 1
    records = shapes.load_split(world_dir, split)
    images = _load_images(world_dir, records, model.visual.image_size[0])
    texts = [r["caption"][0] if isinstance(r["caption"], list) else r["caption"] for r in records]
    img = F.normalize(model.encode_image(images), dim=-1)
    txt = F.normalize(model.encode_text(text_ids(texts)), dim=-1)
    keys = [r["scene_key"] for r in records]
    sim = img @ txt.T
    i2t = sum(keys[int(j)] == keys[i] for i, j in enumerate(sim.argmax(1))) / len(records)
    t2i = sum(keys[int(j)] == keys[i] for i, j in enumerate(sim.argmax(0))) / len(records)
    result = {"i2t_r1": i2t, "t2i_r1": t2i}
    single = [i for i, r in enumerate(records) if len(r["scene"]) == 1]
    if single:  # zero-shot: the best of one caption per possible one-object scene
        candidates = [
            shapes.Scene((shapes.Obj(shape, colour, size, position),))
            for shape in shapes.SHAPES for colour in shapes.COLOURS for size in shapes.SIZES
            for position in shapes.POSITIONS
        ]  # fmt: skip
        prompts = [shapes.caption(c, random.Random(0), level="simple", template=0) for c in candidates]
        emb = torch.cat([F.normalize(model.encode_text(text_ids(prompts[i : i + 256])), dim=-1)
                         for i in range(0, len(prompts), 256)])  # fmt: skip
        pred = (img[single] @ emb.T).argmax(1)
        for attribute in ("shape", "colour", "size", "position"):
            hits = [getattr(candidates[int(p)].objects[0], attribute) == records[i]["scene"][0][attribute]
                    for p, i in zip(pred, single)]  # fmt: skip
            result[f"zs_{attribute}"] = sum(hits) / len(single)
        result["zs_scene"] = sum(candidates[int(p)].key() == records[i]["scene_key"] for p, i in zip(pred, single)) / len(
            single
        )
    return result


# ----------------------------------------------------------------------------------------------
# Language model


def lm_example(text: str, *, num_queries: int = 8, filler: str = DEFAULT_FILLER) -> tuple[str, str]:
    """Split an `iter_lm_texts` string into (context, target): context "scene : <words padded
    with `filler` to `num_queries` words> ." and target "caption : ..." / "question : ... answer
    : ...", the part that gets a loss."""
    head, sep, target = text.partition(" . ")
    if not sep or not head.startswith("scene : "):
        raise ValueError(f"not a conditional LM text: {text!r}")
    words = head[len("scene : ") :].split()
    words += [filler] * max(0, num_queries - len(words))
    return f"scene : {' '.join(words)} .", target


def scene_context(scene: shapes.Scene, *, num_queries: int = 8, filler: str = DEFAULT_FILLER) -> str:
    """The context of a scene's true attribute words, in canonical order, as `lm_example` pads it."""
    words = " , ".join(f"{o.size} {o.colour} {o.shape} {o.position}" for o in scene.objects)
    return lm_example(f"scene : {words} . x", num_queries=num_queries, filler=filler)[0]


def _lm_model(kind: LMKind, tok: PreTrainedTokenizerFast, *, hidden: int, layers: int, heads: int,
              max_positions: int, tie_embeddings: bool = True) -> torch.nn.Module:  # fmt: skip
    """A small OPT (input and output embeddings tied, as OPT's are, unless `tie_embeddings` is
    False) or T5 (tied too: the installed transformers' `T5Config` sets `tie_word_embeddings` to
    True whatever it is given)."""
    from transformers import (
        OPTConfig,
        OPTForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    rows = -(-len(tok) // 16) * 16  # a padded vocabulary, as real checkpoints have
    if kind == "opt":
        config = OPTConfig(
            vocab_size=rows, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=4 * hidden,
            num_attention_heads=heads, max_position_embeddings=max_positions, word_embed_proj_dim=hidden,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0, init_std=0.02,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            tie_word_embeddings=tie_embeddings,
        )  # fmt: skip
        return OPTForCausalLM(config)
    config = T5Config(
        vocab_size=rows, d_model=hidden, d_kv=hidden // heads, d_ff=4 * hidden, num_layers=layers,
        num_decoder_layers=layers, num_heads=heads, dropout_rate=0.0, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )  # fmt: skip
    return T5ForConditionalGeneration(config)


def _slot_words(context: str) -> str:
    """The scene slot's words of an `lm_example` context: "scene : w1 .. wq ." -> "w1 .. wq"."""
    return context[len("scene : ") : -len(" .")]


def slot_objects(context: str, filler: str = DEFAULT_FILLER) -> list[str]:
    """The objects of an `lm_example` context, each as its attribute words:
    "scene : small red circle left , big blue star top none ." -> ["small red circle left", "big
    blue star top"]."""
    words = [w for w in _slot_words(context).split() if w != filler]
    return [o.strip() for o in " ".join(words).split(",") if o.strip()]


def object_slot_embeds(
    embedding: torch.nn.Module, kind: LMKind, tok: PreTrainedTokenizerFast, objects: Sequence[Sequence[str]],
    places: Sequence[Sequence[int]], *, num_queries: int, filler: str = DEFAULT_FILLER,
) -> torch.Tensor:  # fmt: skip
    """Scene slots of the "objects" layout, (b, num_queries, d): in row i, object j (its words, as
    `slot_objects` gives them) sits at position `places[i][j]` as the sum of its words' input
    embeddings, and every other position is the filler word's embedding. The words are tokenized as
    they are inside a "words" slot (`_lm_inputs`), so an object of one word is exactly that word."""
    lead = " " if kind == "opt" else ""
    ids = {o: tok(lead + o, add_special_tokens=False)["input_ids"] for row in objects for o in row}
    filler_ids = tok(lead + filler, add_special_tokens=False)["input_ids"]
    if len(filler_ids) != 1:
        raise ValueError(f"The filler {filler!r} is {len(filler_ids)} tokens of this tokenizer; it must be one: "
                         "pass a filler word that the tokenizer was trained on.")  # fmt: skip
    filler_id = filler_ids[0]
    width = max([1, *map(len, ids.values())])
    index = torch.full((len(objects), num_queries, width), filler_id, dtype=torch.long)
    weight = torch.zeros(len(objects), num_queries, width)
    weight[:, :, 0] = 1.0
    for i, (row, where) in enumerate(zip(objects, places)):
        if len(row) != len(where) or len(set(where)) != len(where) or not all(0 <= p < num_queries for p in where):
            raise ValueError(f"row {i}: {len(row)} objects need as many distinct places in [0, {num_queries}), got {list(where)}")
        for obj, p in zip(row, where):
            n = len(ids[obj])
            index[i, p, :n] = torch.tensor(ids[obj])
            weight[i, p] = 0.0
            weight[i, p, :n] = 1.0
    vectors = embedding(index)
    return (vectors * weight.to(vectors.dtype)[..., None]).sum(dim=2)


def _lm_inputs(kind: LMKind, tok: PreTrainedTokenizerFast, slots: Sequence[str], tasks: Sequence[str]) -> list[list[int]]:
    """Token ids of each scene slot's words and its task text, laid out as stage 2 lays out a soft
    prompt and its prompt (`bridges.language`), the slot's words where the soft prompt goes: OPT
    " <slot>" + BOS + ". <task>" (" " + slot: every word its own token with its leading space, as in
    the captions); T5's encoder "<slot> . <task>" + EOS."""
    if kind == "opt":
        n = len(slots)
        enc = tok([" " + s for s in slots] + [". " + t for t in tasks], add_special_tokens=False)["input_ids"]
        return [s + [tok.bos_token_id] + t for s, t in zip(enc[:n], enc[n:])]
    return tok([f"{s} . {t}" for s, t in zip(slots, tasks)])["input_ids"]


def _lm_batch(kind: LMKind, tok: PreTrainedTokenizerFast, pairs: Sequence[tuple[str, str]], newline_id: int
              ) -> dict[str, torch.Tensor]:  # fmt: skip
    """A training batch laid out as stage 2 lays out a soft prompt and its text (`_lm_inputs`;
    `bridges.language.LanguageBridge.training_inputs`): OPT reads "<slot>" + BOS + ". caption :
    <caption>" + "\\n" (loss after the "."), T5's encoder "<slot> . caption :" + EOS and its
    decoder "<caption>" + EOS (likewise "question : ... answer :" and the answer)."""
    slots = [_slot_words(c) for c, _ in pairs]
    if kind == "opt":
        rows = []
        for row in _lm_inputs(kind, tok, slots, [t for _, t in pairs]):
            cut = row.index(tok.bos_token_id) + 2  # the slot, BOS and "." get no loss
            rows.append((row[:cut], row[cut:] + [newline_id]))
        width = max(len(c) + len(t) for c, t in rows)
        ids, mask, labels = [], [], []
        for c, t in rows:
            pad = width - len(c) - len(t)
            ids.append(c + t + [tok.pad_token_id] * pad)
            mask.append([1] * (len(c) + len(t)) + [0] * pad)
            labels.append([-100] * len(c) + t + [-100] * pad)
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}
    # T5: the encoder reads the slot and the target's first words, up to and including the colon
    # before the caption or answer; the decoder writes the caption / answer
    leads, answers = zip(*(t.rpartition(" : ")[::2] for _, t in pairs))
    e = tok.pad({"input_ids": _lm_inputs(kind, tok, slots, [f"{lead} :" for lead in leads])}, return_tensors="pt")
    d = tok(list(answers), add_special_tokens=True)["input_ids"]
    width = max(map(len, d))
    labels = torch.tensor([x + [-100] * (width - len(x)) for x in d])
    return {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"], "labels": labels}


def blend_scene_slot(embeds: torch.Tensor, start: int, length: int, alpha: torch.Tensor) -> torch.Tensor:
    """Input embeddings (b, L, d) with the scene slot (positions start .. start + length) blended
    toward its own mean: each slot position becomes (1 - a) * itself + a * the slot's mean, with
    `alpha` (b,) the a of each example (0: unchanged; 1: every position the bag of the words)."""
    slot = embeds[:, start : start + length]
    if slot.shape[1] != length:
        raise ValueError(f"The scene slot (positions {start} to {start + length}) runs past the {embeds.shape[1]} positions.")
    a = alpha.to(embeds.dtype)[:, None, None]
    blended = (1 - a) * slot + a * slot.mean(dim=1, keepdim=True)
    return torch.cat([embeds[:, :start], blended, embeds[:, start + length :]], dim=1)


def noisy_slot(vectors: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Scene slots (b, q, d) plus Gaussian noise of standard deviation `scale` times each row's RMS
    (the root mean square of its q * d entries, not differentiated through): the noise is the same
    size against the slot whatever the scale of the LM's embeddings."""
    rms = vectors.detach().pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
    return vectors + scale * rms * torch.randn(vectors.shape, generator=generator, dtype=vectors.dtype)


def train_world_lm(
    kind: LMKind,
    world_level: shapes.Level,
    out_dir: str | Path,
    *,
    seed: int = 0,
    steps: int | None = None,
    batch_size: int = 64,
    lr: float = 2e-3,
    hidden: int = 128,
    layers: int = 3,
    heads: int = 4,
    num_queries: int = 8,
    filler: str = DEFAULT_FILLER,
    n_texts: int | None = None,
    exists_weight: float = 1.0,
    slot_blend: float = 0.0,
    slot: SlotLayout = "words",
    slot_noise: float = 0.0,
    time_budget_s: float | None = None,
    log_every: int = 100,
) -> str:
    """Train a tiny OPTForCausalLM ("opt") or T5ForConditionalGeneration ("t5") on the world's
    conditional texts (`shapes.iter_lm_texts`, scene slot padded to `num_queries` words with
    `filler`) and save model and tokenizer to `out_dir` with `save_pretrained`.

    Each example is laid out as stage 2 will lay out the soft prompt that takes the scene slot's
    place (`_lm_batch`): OPT reads the slot's words, BOS, ". caption : <caption>" + "\\n", with
    the loss after the "." ("\\n" is OPT's end of text in BLIP-2); T5's encoder reads "<slot
    words> . caption :" (or ". question : ... answer :"), its decoder writes the caption / answer
    + EOS. Returns `out_dir`.

    `slot_blend` > 0: each example's scene slot is blended toward its mean by a ~ U(0, slot_blend)
    (`blend_scene_slot`), so the LM learns to read the scene from slots that are mixtures of its
    words, as the query outputs of a stage-1 Q-Former are (they share the scene through
    self-attention), not only from one exact word per position.

    `slot="objects"`: the scene slot holds one position per object, the sum of its words' input
    embeddings (`object_slot_embeds`), at positions drawn at random for each example, the filler
    word everywhere else. Which attribute belongs to which object is then where it sits, not an
    order of words to be followed: on the full world (1 to 3 objects) a "words" LM put positions
    and sizes on the wrong object and captioned about half the scenes right from their true words,
    an "objects" LM of the same size and steps about 0.85 (docs/demo_history.md).

    `slot_noise` > 0 (with `slot="objects"`): Gaussian noise of `slot_noise` times each row's slot
    RMS (`noisy_slot`) is added to every slot position, so the LM learns to read approximate object
    vectors, as the soft prompt gives it, not only exact sums of word embeddings. Off in the demo:
    on the full world, five seeds each, stage 2 from one stage 1 through LMs trained with 0.5 wrote
    0.528 of captions all right on average, without 0.516 (paired difference +0.012, inside the
    0.44 to 0.62 spread between LM trainings; docs/demo_history.md, session 21)."""
    if not 0.0 <= slot_blend <= 1.0:
        raise ValueError(f"`slot_blend` is the largest blend weight, in [0, 1]; got {slot_blend}.")
    if slot not in ("words", "objects"):
        raise ValueError(f'`slot` must be "words" or "objects", got {slot!r}')
    if slot == "objects" and slot_blend > 0:
        raise ValueError('`slot_blend` blends a slot of words; with `slot="objects"` leave it at 0.')
    if slot_noise < 0 or (slot_noise > 0 and slot != "objects"):
        raise ValueError(f'`slot_noise` is a noise scale >= 0 for `slot="objects"`; got {slot_noise} with slot={slot!r}.')
    # defaults measured on 2 CPU cores: OPT 1500 steps ~110 s, T5 1000 steps ~150 s
    steps = steps or DEFAULT_LM_STEPS[kind]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_texts = n_texts or min(steps * batch_size, 200_000)
    texts = list(shapes.iter_lm_texts(world_level, seed=seed, n=n_texts, exists_weight=exists_weight))
    pairs = [lm_example(t, num_queries=num_queries, filler=filler) for t in texts]
    if slot_blend > 0:
        longest = max(len(c.split()) - 3 for c, _ in pairs)  # "scene : <words> ."
        if longest > num_queries:
            raise ValueError(
                f"`slot_blend` blends a scene slot of `num_queries` ({num_queries}) words, but this world's "
                f"scenes take up to {longest}: raise `num_queries` to {longest} or leave `slot_blend` at 0."
            )
    if slot == "objects":
        most = max(len(slot_objects(c, filler)) for c, _ in pairs)
        if most > num_queries:
            raise ValueError(f"This world's scenes hold up to {most} objects, more than the slot's `num_queries` "
                             f"({num_queries}) positions: raise `num_queries` to at least {most}.")  # fmt: skip
    tok = world_tokenizer([c + " " + t for c, t in pairs], kind)
    newline_id = tok("\n", add_special_tokens=False)["input_ids"]
    if kind == "opt" and len(newline_id) != 1:
        raise AssertionError(f'"\\n" must be one token, got {newline_id}')
    torch.manual_seed(seed)
    # an "objects" slot is sums of input embeddings: tied to the output layer as well, OPT learned to
    # read them slowly and by the seed's luck (full world, 1500 steps, captions from the true words
    # 0.16 to 0.85 over four trainings); untied 0.75 to 0.89 over three seeds (docs/demo_history.md). (T5 stays tied:
    # the installed transformers' T5Config forces it; its object slot is unmeasured.)
    model = _lm_model(kind, tok, hidden=hidden, layers=layers, heads=heads, max_positions=256,
                      tie_embeddings=slot == "words")  # fmt: skip
    blend_rng = torch.Generator().manual_seed(seed)
    place_rng = random.Random(f"{seed}/lm-slot")
    noise_rng = torch.Generator().manual_seed(seed + 1)
    empty_slot = f"scene : {' '.join([filler] * num_queries)} ."
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = adamw(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=lr,
        betas=(0.9, 0.98),
    )  # fmt: skip
    rng = random.Random(f"{seed}/lm-order")
    order = list(range(len(pairs)))
    rng.shuffle(order)
    cursor = 0
    start = time.perf_counter()
    model.train()
    step = 0
    last = float("nan")
    while step < steps:
        progress = _progress(step, steps, start, time_budget_s)
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(progress, lr)
        if cursor + batch_size > len(order):
            rng.shuffle(order)
            cursor = 0
        chosen = [pairs[i] for i in order[cursor : cursor + batch_size]]
        cursor += batch_size
        if slot == "objects":  # the rows' slots laid out empty, then filled with the objects' vectors
            objects = [slot_objects(c, filler) for c, _ in chosen]
            batch = _lm_batch(kind, tok, [(empty_slot, t) for _, t in chosen], newline_id[0])
            embed = model.get_input_embeddings()
            places = [place_rng.sample(range(num_queries), len(row)) for row in objects]
            vectors = object_slot_embeds(embed, kind, tok, objects, places, num_queries=num_queries, filler=filler)
            if slot_noise > 0:
                vectors = noisy_slot(vectors, slot_noise, noise_rng)
            batch["inputs_embeds"] = torch.cat([vectors, embed(batch.pop("input_ids")[:, num_queries:])], dim=1)
        else:
            batch = _lm_batch(kind, tok, chosen, newline_id[0])
        if slot_blend > 0:
            ids = batch.pop("input_ids")
            alpha = slot_blend * torch.rand(ids.shape[0], generator=blend_rng)
            embeds = model.get_input_embeddings()(ids)
            batch["inputs_embeds"] = blend_scene_slot(embeds, 0, num_queries, alpha)  # the slot opens each row
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        last = loss.item()
        if step % log_every == 0 or step == 1:
            _log(f"{kind} step {step}/{steps} loss {last:.4f} lr {optimizer.param_groups[0]['lr']:.2e} "
                 f"{time.perf_counter() - start:.0f}s")  # fmt: skip
    seconds = time.perf_counter() - start
    _log(f"{kind} trained {step} steps in {seconds:.1f}s, final loss {last:.4f}")
    model.eval()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    info = {"kind": kind, "level": world_level, "num_queries": num_queries, "filler": filler, "slot_blend": slot_blend, "slot": slot, "slot_noise": slot_noise, "steps_done": step,
            "steps": steps, "seconds": seconds, "final_loss": last, "seed": seed}  # fmt: skip
    (out_dir / "lm_train_info.txt").write_text(json.dumps(info, indent=2) + "\n")
    return str(out_dir)


def bert_pairs(world_level: shapes.Level, *, seed: int = 0, n: int = 20000) -> list[tuple[str, str, int]]:
    """BERT's two pre-training tasks, in this world: (a caption, a text, label). The text is about
    the same scene (label 0, BERT's "is next") or, half the time, about another scene (label 1).
    A text is "caption : <caption>" or "question : <question> answer : <answer>", the words of the
    demo's prompts; scenes come from the training distribution only (no held-out pair)."""
    rng = random.Random(f"{seed}/bert/{world_level}")
    holdout = shapes.DEFAULT_HOLDOUT

    def text(scene: shapes.Scene) -> str:
        if rng.random() < 0.5:
            return f"caption : {shapes.caption(scene, rng, level=world_level)}"
        qa = rng.choice(shapes.make_qa(scene, rng, avoid=holdout))
        return f"question : {qa['question']} answer : {qa['answer']}"

    pairs = []
    for _ in range(n):
        scene = shapes.sample_scene(world_level, rng, holdout=holdout)
        first = f"caption : {shapes.caption(scene, rng, level=world_level)}"
        other = rng.random() < 0.5
        pairs.append((first, text(shapes.sample_scene(world_level, rng, holdout=holdout) if other else scene), int(other)))
    return pairs


def train_world_bert(
    world_level: shapes.Level,
    out_dir: str | Path,
    *,
    seed: int = 0,
    steps: int = 400,
    batch_size: int = 128,
    lr: float = 2e-3,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    intermediate: int = 256,
    max_positions: int = 64,
    n_texts: int = 20000,
    mask_prob: float = 0.15,
    time_budget_s: float | None = None,
    log_every: int = 100,
) -> str:
    """Pre-train a tiny BERT on the world's text with BERT's two tasks (`bert_pairs`): masked words
    (15% of them; of those 80% [MASK], 10% a random word, 10% kept) and "same scene?" from [CLS]
    (BERT's next-sentence task, which is what trains [CLS] to sum up the text; the Q-Former's
    ITC reads [CLS]). `time_budget_s`: stop early, the schedule compressed, once training has
    taken this long. Saved with its word-level tokenizer to `out_dir` as a `BertForPreTraining`:
    the world's stand-in for bert-base-uncased, which BLIP-2 starts its Q-Former from
    (`bert_init.init_from_bert` reads it like any BERT checkpoint). Returns `out_dir`.

    Measured on the demo (stage 1, 1000 steps of 32): from a random trunk ITC stays at chance for
    ~150 steps; from a BERT trained on masked words alone, whose [CLS] hardly depends on the text
    (mean cosine 0.95 between captions), for ~300; see docs/demo_history.md, "The world BERT"."""
    from transformers import BertConfig, BertForPreTraining

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = bert_pairs(world_level, seed=seed, n=n_texts)
    texts = [t for a, b, _ in pairs for t in (a, b)]
    # every attribute word, whether or not the sampled texts happen to use it
    vocabulary = [" ".join(map(str, values)) for values in (shapes.SHAPES, shapes.COLOURS, shapes.SIZES,
                  shapes.POSITIONS, shapes.RELATIONS, shapes.COUNT_WORDS[1:])]  # fmt: skip
    tok = bert_word_tokenizer(texts + vocabulary)
    enc = tok([a for a, _, _ in pairs], [b for _, b, _ in pairs], padding="longest", truncation=True,
              max_length=max_positions, return_tensors="pt", return_token_type_ids=True)  # fmt: skip
    ids, attention, segments = enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]
    other_scene = torch.tensor([label for _, _, label in pairs])
    special = torch.tensor([tok.convert_tokens_to_ids(t) for t in BERT_SPECIALS])
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=intermediate, max_position_embeddings=max_positions, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=tok.pad_token_id)  # fmt: skip
    model = BertForPreTraining(config)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = adamw([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                      lr=lr, betas=(0.9, 0.98))  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    first = last = float("nan")
    step = 0
    while step < steps:
        progress = _progress(step, steps, start, time_budget_s)
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(progress, lr)
        idx = torch.randint(0, len(ids), (batch_size,), generator=generator)
        x, mask, segment = ids[idx].clone(), attention[idx], segments[idx]
        width = int(mask.sum(dim=1).max())
        x, mask, segment = x[:, :width], mask[:, :width], segment[:, :width]
        chosen = (torch.rand(x.shape, generator=generator) < mask_prob) & (mask == 1) & ~torch.isin(x, special)
        labels = torch.where(chosen, x, torch.full_like(x, -100))
        roll = torch.rand(x.shape, generator=generator)
        x[chosen & (roll < 0.8)] = tok.mask_token_id
        swap = chosen & (roll >= 0.8) & (roll < 0.9)
        x[swap] = torch.randint(len(BERT_SPECIALS), len(tok), (int(swap.sum()),), generator=generator)
        loss = model(input_ids=x, attention_mask=mask, token_type_ids=segment, labels=labels,
                     next_sentence_label=other_scene[idx]).loss  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        last = loss.item()
        first = last if step == 0 else first
        step += 1
        if step % log_every == 0 or step == 1:
            _log(f"bert step {step}/{steps} loss {last:.4f} {time.perf_counter() - start:.0f}s")
    seconds = time.perf_counter() - start
    _log(f"bert trained {step} steps in {seconds:.1f}s, final loss {last:.4f}")
    model.eval()
    # how much [CLS] depends on the caption (ITC's text side starts from it): the mean cosine
    # between the [CLS] outputs of 256 captions; near 1 means [CLS] says nothing of the text
    # and the masked-word accuracy on 256 captions with one word of the caption masked each (not
    # of its fixed "caption :" prefix)
    with torch.no_grad():
        captions = tok([a for a, _, _ in pairs[:256]], padding="longest", return_tensors="pt")
        cls = F.normalize(model.bert(**captions).last_hidden_state[:, 0], dim=-1)
        x, n_words = captions["input_ids"].clone(), captions["attention_mask"].sum(dim=1) - 4
        where = 3 + (torch.rand(len(x), generator=generator) * n_words).long()  # after [CLS] caption :
        rows = torch.arange(len(x))
        truth = x[rows, where].clone()
        x[rows, where] = tok.mask_token_id
        logits = model(input_ids=x, attention_mask=captions["attention_mask"]).prediction_logits
        accuracy = (logits[rows, where].argmax(-1) == truth).float().mean().item()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    info = {"level": world_level, "steps_done": step, "steps": steps, "seconds": seconds, "first_loss": first,
            "final_loss": last, "masked_word_accuracy": accuracy, "cls_mean_cosine": (cls @ cls.T).mean().item(),
            "seed": seed}  # fmt: skip
    (out_dir / "bert_train_info.txt").write_text(json.dumps(info, indent=2) + "\n")
    return str(out_dir)


@torch.no_grad()
def evaluate_world_lm(llm_dir: str | Path, world_level: shapes.Level, *, n: int = 200, seed: int = 12345,
                      num_queries: int = 8, filler: str = DEFAULT_FILLER, batch_size: int = 50) -> dict[str, float]:  # fmt: skip
    """Given the TRUE scene words in place of the soft prompt (laid out as `_lm_batch` and stage 2
    lay it out), the fraction of greedy captions that `shapes.all_correct` accepts and the accuracy
    of greedy answers to `make_qa` questions (n scenes each). An LM trained with `slot="objects"`
    (read from its `lm_train_info.txt`) gets each object's vector in the first positions of the slot."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llm_dir)
    config = json.loads((Path(llm_dir) / "config.json").read_text())
    seq2seq = config.get("is_encoder_decoder", False)
    model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(llm_dir).eval()
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    stop = tok.eos_token_id if seq2seq else newline[0]
    info_file = Path(llm_dir) / "lm_train_info.txt"
    layout = json.loads(info_file.read_text()).get("slot", "words") if info_file.is_file() else "words"
    kind: LMKind = "t5" if seq2seq else "opt"
    rng = random.Random(f"{seed}/lm-eval")
    scenes = [shapes.sample_scene(world_level, rng) for _ in range(n)]
    qas = [rng.choice(shapes.make_qa(s, rng)) for s in scenes]
    objects = [[f"{o.size} {o.colour} {o.shape} {o.position}" for o in s.objects] for s in scenes]
    if layout == "objects":  # the prompts' slots laid out empty; the objects' vectors go in below
        slots = [" ".join([filler] * num_queries)] * n
    else:
        slots = [_slot_words(scene_context(s, num_queries=num_queries, filler=filler)) for s in scenes]

    cap_prompts = _lm_inputs(kind, tok, slots, ["caption :"] * n)
    qa_prompts = _lm_inputs(kind, tok, slots, [f"question : {q['question']} answer :" for q in qas])

    def generate(prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        outs = []
        for i in range(0, len(prompts), batch_size):
            rows = prompts[i : i + batch_size]
            width = max(map(len, rows))
            pads = [[tok.pad_token_id] * (width - len(r)) for r in rows]
            # OPT continues the last token, so left padding; T5's encoder reads it all, right padding
            ids = [p + r if not seq2seq else r + p for r, p in zip(rows, pads)]
            mask = [[0] * len(p) + [1] * len(r) if not seq2seq else [1] * len(r) + [0] * len(p) for r, p in zip(rows, pads)]
            inputs: dict[str, torch.Tensor] = {"input_ids": torch.tensor(ids)}
            if layout == "objects":
                embed = model.get_input_embeddings()
                with torch.no_grad():
                    embeds = embed(inputs.pop("input_ids"))
                    rows_objects = objects[i : i + batch_size]
                    vectors = object_slot_embeds(embed, kind, tok, rows_objects, [range(len(r)) for r in rows_objects],
                                                 num_queries=num_queries, filler=filler)  # fmt: skip
                for j, p in enumerate(pads):  # the slot opens each row, after OPT's left padding
                    start = 0 if seq2seq else len(p)
                    embeds[j, start : start + num_queries] = vectors[j]
                inputs["inputs_embeds"] = embeds
            gen = model.generate(**inputs, attention_mask=torch.tensor(mask), max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1, eos_token_id=stop, pad_token_id=tok.pad_token_id)  # fmt: skip
            if not seq2seq and layout == "words":
                gen = gen[:, width:]
            outs += [t.split("\n")[0].strip() for t in tok.batch_decode(gen, skip_special_tokens=True)]
        return outs

    captions = generate(cap_prompts, 60)
    answers = generate(qa_prompts, 8)
    return {
        "caption_all_correct": sum(shapes.all_correct(c, s) for c, s in zip(captions, scenes)) / n,
        "vqa_accuracy": sum(a == q["answer"] for a, q in zip(answers, qas)) / n,
        "example_caption": captions[0],  # type: ignore[dict-item]
    }


# ----------------------------------------------------------------------------------------------
# Cache


def default_cache_dir() -> Path:
    return Path(os.environ.get("QFORMER_CACHE") or Path.home() / ".cache" / "qformer" / "shapesworld")


def vit_settings(level: str, seed: int, fast: bool) -> dict[str, Any]:
    # One patch per cell of the world's 3x3 layout: 63x63 images (the 64x64 renders, resized) in
    # 21x21 patches, so every object lies (almost) whole inside one token.
    layout = {"image_size": 63, "patch_size": 21}
    if fast:
        world = {"n_train": 64, "n_test": 16, "twins": True}
        train = {"steps": 2, "batch_size": 16, "width": 32, "layers": 2, "heads": 2, "embed_dim": 16,
                 "text_width": 32, "text_layers": 1, "context_length": 40, **layout}  # fmt: skip
    else:
        # Shape twins (`shapes.generate_world(twins=True)`): every scene shares its batch with a
        # copy that differs in one object's shape, so open_clip's loss must see shape, which a
        # small object (11 pixels) shows least. The full world's batches otherwise differ in so
        # much else that its ViT barely learned shape; more images help it a little more.
        world = {"n_train": 10000 if level == "simple" else 40000, "n_test": 500, "twins": True}
        # measured on the simple world, 10k images (zero-shot shape; retrieval R@1 i2t / t2i;
        # seconds on 2 cores):
        #   64x64 in 8x8 patches, width 96, 2400 steps        0.94; 0.95 / 0.99   ~680 s
        #   63x63 in 21x21 patches, width 128, 1500 steps     0.87; 0.92 / 0.95    150 s
        #   the same, 3000 steps                              0.92; 0.96 / 0.98    330 s
        #   the same, text context cut to 16 tokens (simple)   0.92; 0.94 / 0.98    246 s
        #   the same, shape twins                              0.95; 0.97 / 0.99    309 s
        #   shape twins, 2000 steps                            0.92; 0.96 / 0.99    202 s
        #   shape twins, 1500 steps                            0.91; 0.94 / 0.96
        # linear probe of shape from an object's own grid token (unseen images; small objects):
        #   simple world 0.83 (0.69) without twins, 0.89 to 0.91 with (3000 steps; for fewer
        #   steps see below);
        #   full world, 3000 steps, 10k images without twins 0.72 (0.46);
        #   full world, 1000 steps: 0.65 without twins (10k or 40k images), 0.71 with (10k),
        #   0.73 with (40k); width 192 instead of 128: 0.75, 15% slower; 16x16 patches: worse
        # (the CLIP text tower's context: captions have at most 12 words on the simple world, 32
        # on the full one)
        # the simple world's ViT: 1800 steps at 2e-3, for the demo's ten minutes; it trains on one
        # thread beside the LM and the BERT and ends about when they do. Linear probe of shape
        # (small objects), one training each: 3000 steps at 1e-3 0.890 (0.806); 2000 at 1e-3
        # 0.825 (0.685) (0.87 in an earlier training); 2000 at 2e-3 0.867 (0.771); 1800 at 2e-3 0.850 (0.736); 2000 at 3e-3
        # 0.742 (0.535); 1500 at 2e-3 0.767 (0.586); 2000 at 2e-3 in batches of 96 0.768 (0.570)
        # The CLIP text tower of the simple world has one layer, not two: a step costs 15% less
        # (0.145 s against 0.162 on one thread) and the ViT is as good (alone, 500 test images:
        # R@1 0.940 / 0.974 and zero-shot shape 0.890, against 0.942 / 0.972 and 0.884); one
        # object's caption is its bag of words. The full world's relations keep two.
        steps, lr = (1800, 2e-3) if level == "simple" else (3000, 1e-3)
        train = {"steps": steps, "batch_size": 128, "lr": lr, "width": 128, "heads": 4,
                 "context_length": 16 if level == "simple" else 40, **layout}  # fmt: skip
        if level == "simple":
            train["text_layers"] = 1
    return {"what": "vit", "version": VERSION, "level": level, "seed": seed, "world": world, "train": train}


def lm_settings(level: str, seed: int, llm: str, fast: bool, num_queries: int) -> dict[str, Any]:
    # "exists" questions (is there a <colour> <shape>?) weighted 4x: at the natural 1 in 6 the
    # OPT answered them at chance (0.50) from the true scene words, at 4x 0.91 (measured, 400
    # test questions; the other types 1.00 either way)
    train: dict[str, Any] = {"num_queries": num_queries, "steps": DEFAULT_LM_STEPS[llm], "exists_weight": 4.0}
    if level == "simple":
        # the scene slot blended toward its mean by a ~ U(0, 1) (`blend_scene_slot`): a stage-1
        # Q-Former's query outputs share the scene (near-copies), and an LM that read only one
        # exact word per slot left stage 2 from stage 1 far behind a fresh Q-Former (captions all
        # right 0.344 / 0.796 after 150 stage-2 steps); blended, the two arms tie (0.792 / 0.784;
        # stage 1 ahead in 9 of 18 comparisons over budgets and seeds; run AE 0.848 / 0.840,
        # CIDEr 4.90 / 5.06). docs/demo_history.md. The full world keeps exact words (a blend of
        # two objects' words loses which attribute is whose; unmeasured).
        # (All of that for OPT in the old layout, see "layout" at the end. In stage 2's layout, OPT: blended and exact words
        # both put stage 1 a little ahead after 400 steps, and the blend makes both arms learn
        # faster, captions 0.81 against 0.74 after 150. T5: exact words left stage 2 from stage 1
        # far behind (captions 0.216 against 0.564 fresh), blended both arms reach 0.84.)
        train["slot_blend"] = 1.0
    else:
        # one slot position per object (`train_world_lm(slot="objects")`): with a slot of words the
        # full world's OPT put positions and sizes on the wrong object, 0.49 of captions right from
        # the TRUE words (1 / 2 / 3 objects: 1.00 / 0.50 / 0.13), and stage 2 through it 0.376
        # (run 14); the same OPT (size, steps) with an object slot 0.85 from the true words (1.00 /
        # 0.80 / 0.79), and stage 2 from run 14's own stage 1 through it 0.660 (0.89 / 0.74 / 0.39),
        # VQA 0.77 against 0.63. Objects at random places, not the first ones: 0.468 through stage 2
        # (three-object scenes 0.02). docs/demo_history.md, "The full world's LM: one slot per object"
        train["slot"] = "objects"
    if fast:
        train |= {"steps": 2, "batch_size": 8, "hidden": 32, "layers": 1, "heads": 2, "n_texts": 200}
    # "layout": the LM reads its scene slot where stage 2 puts the soft prompt (`_lm_batch`); the LMs
    # before it read "BOS scene : <slot> . caption : ...", so stage 2's [soft prompt] BOS ". caption :"
    # moved every position and put the BOS after the slot: from the true words in stage 2's layout
    # that LM captioned 0.49 of scenes right (1.00 in its own), and stage 2 left "is there a ...?"
    # questions at chance (docs/demo_history.md, "The LM's layout")
    return {"what": "llm", "version": VERSION, "layout": "slot where stage 2 puts the soft prompt", "level": level,
            "seed": seed, "kind": llm, "train": train}  # fmt: skip


def bert_settings(level: str, seed: int, fast: bool) -> dict[str, Any]:
    # the trunk of the demo's Q-Former (qformer.demo.DemoSettings reads its shape from the checkpoint)
    # (every training argument is here, so that the cache key changes with any of them). The
    # simple world's takes 300 steps (about 80 s on one thread beside the ViT), so that the LM and
    # it end about when the ViT's cheaper steps do: stage 1 (625 steps, one ViT's cached features)
    # from it reached ITC R@1 0.928 / 0.955, from a 400-step one 0.910 / 0.952
    train: dict[str, Any] = {"steps": 300 if level == "simple" else 400, "batch_size": 128, "lr": 2e-3, "hidden": 128,
                             "layers": 4, "heads": 4, "intermediate": 256, "max_positions": 64, "n_texts": 20000,
                             "mask_prob": 0.15}  # fmt: skip
    if fast:
        train |= {"steps": 2, "batch_size": 8, "n_texts": 200}
    return {"what": "bert", "version": VERSION, "tasks": "masked words + same scene", "level": level, "seed": seed,
            "train": train}  # fmt: skip


def _key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _build_atomically(final: Path, build) -> None:
    """Run `build(tmp_dir)` and rename the result to `final`; a concurrent builder that finished
    first wins and ours is dropped."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_backbones(
    level: shapes.Level,
    *,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    llm: LMKind = "opt",
    fast: bool = False,
    num_queries: int = 8,
    side_by_side: bool | None = None,
    train_bert: bool = True,
    time_budgets: dict[str, float] | None = None,
) -> dict[str, str]:
    """The frozen ViT and LM for `level`, and the BERT the Q-Former starts from, trained on first
    use and cached under `cache_dir` (default `$QFORMER_CACHE` or ~/.cache/qformer/shapesworld),
    each keyed by a hash of its settings. Returns {"vit_name", "vit_weights", "vit_config",
    "llm_dir", "bert_dir"}; the ViT config is registered with open_clip, so
    `VisionBridge.from_open_clip(vit_name, vit_weights)` and `LanguageBridge.from_pretrained(llm_dir)`
    load them; "bert_dir" is a tiny BERT (with its tokenizer) trained on the world's text, the
    Q-Former's starting point as bert-base is BLIP-2's. `fast=True`: tiny models, a few steps (for
    tests). The text models train in a second process beside the ViT (`side_job.SideJob`);
    `side_by_side` forces that on or off (default: `side_job.worth_it`, off with `fast`).
    `train_bert=False` leaves a missing BERT untrained (its path is returned all the same), for
    recipes that do not start from it. `time_budgets`: at most this many seconds of training for
    "vit", "lm" and "bert" (a missing key: no limit); one that runs out stops early, its learning-rate
    schedule compressed, and is cached like a full training (its `*_train_info.txt` says how many
    steps it took, and a later run that finds it says so). A budget makes the schedule follow the
    clock, so two trainings of one seed then differ a little; without one they are bit-identical."""
    from qformer.side_job import SideJob, worth_it

    if level not in shapes.LEVELS:
        raise ValueError(f"`level` must be one of {shapes.LEVELS}, got {level!r}")
    if llm not in ("opt", "t5"):
        raise ValueError(f'`llm` must be "opt" or "t5", got {llm!r}')
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    vs = vit_settings(level, seed, fast)
    vit_dir = cache / f"vit-{level}-{_key(vs)}"
    name = f"shapesworld-vit-{_key(vs)[:10]}"
    ls = lm_settings(level, seed, llm, fast, num_queries)
    llm_dir = cache / f"llm-{llm}-{level}-{_key(ls)}"
    bs = bert_settings(level, seed, fast)
    bert_dir = cache / f"bert-{level}-{_key(bs)}"
    need_vit = not (vit_dir / f"{name}.safetensors").exists()
    need_lm = not (llm_dir / "config.json").exists()
    need_bert = train_bert and not (bert_dir / "config.json").exists()
    if side_by_side is None:
        side_by_side = worth_it(default=not fast)
    budgets = time_budgets or {}
    text = (llm_dir if need_lm else None, ls, bert_dir if need_bert else None, bs, level, seed, budgets.get("lm"),
            budgets.get("bert"))  # fmt: skip
    if need_vit and (need_lm or need_bert) and side_by_side:
        _log("training the ViT and, in a second process beside it, the text models")
        with SideJob(_build_text_models, *text) as side:
            _build_vit(vit_dir, name, vs, level, seed, on_step=side.share, budget_s=budgets.get("vit"))
        side.result()
    else:
        if need_vit:
            _build_vit(vit_dir, name, vs, level, seed, budget_s=budgets.get("vit"))
        _build_text_models(*text)
    for what, info in (("ViT", vit_dir / "vit_train_info.txt"), ("LM", llm_dir / "lm_train_info.txt"),
                       ("BERT", bert_dir / "bert_train_info.txt")):  # fmt: skip
        done, planned = _steps_done(info)
        if done is not None and planned is not None and done < planned:
            _log(f"the {what} in {info.parent} trained {done} of {planned} steps (a time budget ran out); "
                 "delete that folder to train it in full")
    config = vit_dir / f"{name}.json"
    register_vit_config(config)
    return {
        "vit_name": name,
        "vit_weights": str(vit_dir / f"{name}.safetensors"),
        "vit_config": str(config),
        "llm_dir": str(llm_dir),
        "bert_dir": str(bert_dir),
    }


def _steps_done(info: Path) -> tuple[int | None, int | None]:
    """(steps done, steps planned) from a backbone's `*_train_info.txt`; None where not recorded."""
    if not info.is_file():
        return None, None
    fields = json.loads(info.read_text())
    return fields.get("steps_done"), fields.get("steps")


def _build_vit(vit_dir: Path, name: str, vs: dict[str, Any], level: shapes.Level, seed: int,
               on_step: Callable[[], None] | None = None, budget_s: float | None = None) -> None:  # fmt: skip
    def build(tmp: Path) -> None:
        _log(f"training the ShapesWorld ViT into {vit_dir}")
        world = tmp / "world"
        # the training images straight into tensors, no PNGs (the world is cheap to regenerate;
        # its JSON is kept). One thread: the simple world's 10,000 written and read back took
        # 17.0 s, kept in memory 7.7 s; the full world's 40,000 114.6 s and 50.6 s
        transform, train = world_transform(vs["train"]["image_size"]), []

        def keep(split: str, record: dict[str, Any], image: Any) -> None:
            if split == "train":
                train.append(transform(image))

        shapes.generate_world(world, level=level, seed=seed + 1000, n_compositional=0, write_images=False,
                              on_image=keep, **vs["world"])  # fmt: skip
        images = torch.stack(train)
        train.clear()  # not two copies of them while the ViT trains
        train_world_vit(world, tmp, seed=seed, model_name=name, on_step=on_step, time_budget_s=budget_s,
                        images=images, **vs["train"])  # fmt: skip
        (tmp / "settings.txt").write_text(json.dumps(vs, indent=2) + "\n")

    _build_atomically(vit_dir, build)


def _build_text_models(llm_dir: Path | None, ls: dict[str, Any], bert_dir: Path | None, bs: dict[str, Any],
                       level: shapes.Level, seed: int, lm_budget_s: float | None = None,
                       bert_budget_s: float | None = None) -> None:  # fmt: skip
    """The LM, then the BERT the Q-Former starts from (each skipped when its directory is None),
    each in at most its budget of seconds of training (see `ensure_backbones`)."""
    if llm_dir is not None:
        _build_lm(llm_dir, ls, level, seed, lm_budget_s)
    if bert_dir is not None:
        _build_bert(bert_dir, bs, level, seed, bert_budget_s)


def _build_bert(bert_dir: Path, bs: dict[str, Any], level: shapes.Level, seed: int,
                budget_s: float | None = None) -> None:  # fmt: skip
    def build(tmp: Path) -> None:
        _log(f"training the ShapesWorld BERT (the Q-Former's initialisation) into {bert_dir}")
        train_world_bert(level, tmp, seed=seed, time_budget_s=budget_s, **bs["train"])
        (tmp / "settings.txt").write_text(json.dumps(bs, indent=2) + "\n")

    _build_atomically(bert_dir, build)


def _build_lm(llm_dir: Path, ls: dict[str, Any], level: shapes.Level, seed: int, budget_s: float | None = None) -> None:
    def build(tmp: Path) -> None:
        _log(f"training the ShapesWorld {ls['kind']} LM into {llm_dir}")
        train_world_lm(ls["kind"], level, tmp, seed=seed, time_budget_s=budget_s, **ls["train"])
        (tmp / "settings.txt").write_text(json.dumps(ls, indent=2) + "\n")

    _build_atomically(llm_dir, build)
