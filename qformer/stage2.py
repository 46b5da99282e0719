"""Stage 2, generative learning: frozen vision tower -> Q-Former -> Linear -> frozen LLM.

The query outputs (b, q, d) pass through one linear layer into the LLM's width and go in front of
the LLM's own input embeddings as a soft visual prompt. What trains is declared here and checked by
the tests: `ln_vision`, the Q-Former's query path and `proj`. The Q-Former's text-only parts (word
and position embeddings, the text FFN) take no part in stage 2 and are frozen, so the optimizer
sees exactly what learns; the vision tower and the LLM are frozen inside their bridges. Optionally
(`llm_lora=`, `vision_lora=`) a LoRA adapter on the LLM and/or the tower trains as well: their own
weights stay frozen, the adapter is saved beside the Q-Former in peft's format (`llm_adapter/`,
`vision_adapter/`) and reloaded by `from_pretrained`.

With `instruction_aware=True` (InstructBLIP) the text prompt the LLM reads (the caption prompt, or
the question in `vqa_template`) is also the Q-Former's instruction: tokenized with the Q-Former's
own tokenizer, it joins the queries in self-attention (`QFormer.forward_queries`), so the soft
prompt depends on what is asked; only the query outputs go through `proj`. The Q-Former's word and
position embeddings and text FFN then train too, except the last layer's text FFN, whose outputs
nothing reads.

Legend: b batch, q queries, n image tokens, d Q-Former width, d_v vision width, d_llm LLM width.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from qformer.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    LoadReport,
    load_state_dict_strict,
    read_model_dir,
    save_model,
)
from qformer.config import QFormerConfig
from qformer.model import QFormer, check_image_tokens

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from bridges.language import LanguageBridge
    from bridges.lora import LoraSettings
    from bridges.vision import VisionBridge

VQA_PROMPT = "Question: {} Short answer:"
LLM_ADAPTER = "llm_adapter"  # the LoRA adapters' folders in a checkpoint, in peft's format
VISION_ADAPTER = "vision_adapter"
QFORMER_TOKENIZER = "qformer_tokenizer"  # an instruction-aware checkpoint's Q-Former tokenizer
BRIDGES = ("vision.", "language.")  # parameters inside the bridges: frozen, or LoRA adapters

# Stage-1 weights that stage 2 has no use for: the ITC/ITM/ITG heads and the temperature.
STAGE1_ONLY = ("vision_proj.", "text_proj.", "itm_head.", "lm_head.", "temp")


def read_model_config(directory: str | Path) -> dict[str, Any]:
    """A checkpoint directory's `config.json`, the weights left for later (read once, by
    `load_trainable_weights`)."""
    directory = Path(directory)
    for path in (directory / CONFIG_NAME, directory / WEIGHTS_NAME):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: a qformer checkpoint directory holds {CONFIG_NAME} and {WEIGHTS_NAME}."
            )
    return json.loads((directory / CONFIG_NAME).read_text())


def text_only_prefixes(config: QFormerConfig) -> tuple[str, ...]:
    """The Q-Former parts that only text positions use."""
    return (
        "qformer.embeddings.word.",
        "qformer.embeddings.position.",
        *(f"qformer.layers.{i}.ffn_text." for i in range(config.num_layers)),
    )


def tokenize_instructions(
    tokenizer: PreTrainedTokenizerBase, instructions: list[str], *, max_length: int
) -> tuple[Tensor, Tensor]:
    """Instructions -> (ids, attention mask), each (b, t), by the Q-Former's tokenizer with its
    special tokens ([CLS] ... [SEP]), padded on the right whatever the tokenizer's own side (the
    Q-Former counts positions from the first slot), cut at `max_length` (the position table)."""
    encoded = tokenizer(
        list(instructions), padding="longest", padding_side="right", truncation=True, max_length=max_length,
        return_tensors="pt",
    )  # fmt: skip
    return encoded["input_ids"], encoded["attention_mask"]


def unused_prefixes(config: QFormerConfig, *, instruction_aware: bool) -> tuple[str, ...]:
    """The Q-Former parts that cannot reach the soft prompt, frozen in stage 2 (and not saved):
    every text-only part on the query-only path; with an instruction, only the last layer's text
    FFN (its outputs are dropped, and earlier text states reach the queries through attention)."""
    if instruction_aware:
        return (f"qformer.layers.{config.num_layers - 1}.ffn_text.",)
    return text_only_prefixes(config)


class Stage2Model(nn.Module):
    KIND = "qformer-stage2"

    def __init__(
        self,
        config: QFormerConfig,
        *,
        language: LanguageBridge,
        vision: VisionBridge | None = None,
        prompt: str | None = None,
        vqa_template: str = VQA_PROMPT,
        llm_lora: LoraSettings | dict[str, Any] | None = None,
        vision_lora: LoraSettings | dict[str, Any] | None = None,
        instruction_aware: bool = False,
        qformer_tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        """`vision` may be None when training from cached tower tokens (`image_tokens=`).
        `prompt`: the text after the soft prompt that captions were trained with (used by
        `generate` when no prompts are given); `vqa_template`: how `answer` asks questions.
        `llm_lora` / `vision_lora`: {r, alpha, dropout, target_modules} of a LoRA adapter that
        this constructor puts on the given bridge (in place; see `bridges.lora`), None for none.
        `instruction_aware`: the Q-Former also reads each prompt (InstructBLIP), tokenized by
        `qformer_tokenizer` (the tokenizer its text embeddings were trained with: stage 1's)."""
        super().__init__()
        if vision_lora is not None and vision is None:
            raise ValueError(
                "vision_lora adapts the vision tower, but this model has none (it reads cached tower "
                "tokens): pass `vision=`, or leave vision_lora unset."
            )
        if vision is not None and vision.width != config.vision_width:
            raise ValueError(
                f"The vision tower's tokens are {vision.width} wide but the Q-Former expects "
                f"vision_width={config.vision_width}: build the Q-Former for this tower, or use the "
                f"tower it was trained with."
            )
        if "{}" not in vqa_template:
            raise ValueError(f"vqa_template={vqa_template!r} needs a {{}} where the question goes.")
        if instruction_aware:
            _check_qformer_tokenizer(qformer_tokenizer, config)
        self.config = config
        self.instruction_aware = instruction_aware
        self.qformer_tokenizer = qformer_tokenizer  # a plain attribute: tokenizers are no modules
        self.prompt = prompt
        self.vqa_template = vqa_template
        self.vision = vision  # frozen (inside the bridge)
        self.ln_vision = nn.LayerNorm(config.vision_width, eps=config.vision_layer_norm_eps)
        self.qformer = QFormer(config)
        self.proj = nn.Linear(config.hidden_size, language.hidden_size)
        self.language = language  # frozen (inside the bridge)
        for name, p in self.named_parameters():
            if name.startswith(unused_prefixes(config, instruction_aware=instruction_aware)):
                p.requires_grad_(False)
        # the adapters: inside the bridges, they are the only parameters there that train
        if llm_lora is not None:
            language.add_lora(llm_lora, key="llm_lora")
        if vision_lora is not None:
            vision.add_lora(vision_lora, key="vision_lora")

    # ------------------------------------------------------------------ the flow of a batch
    def image_tokens(self, pixel_values: Tensor) -> Tensor:
        if self.vision is None:
            raise ValueError("This model has no vision tower: pass cached `image_tokens=` instead of pixels.")
        return self.vision(pixel_values)  # (b, n, d_v), no gradient

    def soft_prompt(
        self,
        *,
        pixel_values: Tensor | None = None,
        image_tokens: Tensor | None = None,
        instructions: list[str] | None = None,
    ) -> Tensor:
        """Images -> the soft visual prompt (b, q, d_llm). `instructions` (instruction-aware models
        only, and required there): one text per image, the prompt the LLM reads after it."""
        if instructions is not None and not self.instruction_aware:
            raise ValueError(
                "`instructions` were given, but this model's Q-Former reads none (instruction_aware=False): "
                "leave them out, or train with `instruction_aware: true`."
            )
        if self.instruction_aware and instructions is None:
            raise ValueError(
                "This model is instruction-aware: its soft prompt depends on the instruction. Pass "
                "`instructions=` (one per image: the prompt the LLM reads, e.g. the caption prompt, "
                "\"\" for none, or the question in `vqa_template`)."
            )
        if (pixel_values is None) == (image_tokens is None):
            raise ValueError("Give exactly one of `pixel_values` and `image_tokens`.")
        if image_tokens is None:
            image_tokens = self.image_tokens(pixel_values)
        elif self.vision is not None and self.vision.lora is not None:
            raise ValueError(
                "This model's vision tower has a LoRA adapter, which cached `image_tokens` were computed "
                "without: pass `pixel_values`."
            )
        check_image_tokens(image_tokens, self.config.vision_width)
        image = self.ln_vision(image_tokens.float())  # (b, n, d_v), fp32
        if instructions is None:
            queries = self.qformer.forward_queries(image)  # (b, q, d)
        else:
            if len(instructions) != image.shape[0]:
                raise ValueError(
                    f"{image.shape[0]} images but {len(instructions)} instructions: pass one instruction per image."
                )
            ids, mask = self.tokenize_instructions(instructions)  # (b, t), (b, t)
            queries = self.qformer.forward_queries(image, instruction_ids=ids, instruction_mask=mask)
        return self.proj(queries)  # (b, q, d_llm)

    def tokenize_instructions(self, instructions: list[str]) -> tuple[Tensor, Tensor]:
        """Instructions -> (ids, attention mask), each (b, t), on the Q-Former's device."""
        if self.qformer_tokenizer is None:
            raise ValueError("This model has no Q-Former tokenizer (`qformer_tokenizer=`) to read instructions with.")
        ids, mask = tokenize_instructions(self.qformer_tokenizer, instructions, max_length=self.config.max_position_embeddings)
        device = self.qformer.query_tokens.device
        return ids.to(device), mask.to(device)

    def _instructions(self, prompts: list[str] | str | None, b: int) -> list[str] | None:
        """The Q-Former's instructions for a batch with these LLM prompts: the prompts themselves
        ("" where there is none) when instruction-aware, else None."""
        if not self.instruction_aware:
            return None
        if prompts is None:
            return [""] * b
        return [prompts] * b if isinstance(prompts, str) else list(prompts)

    def forward(
        self,
        texts: list[str],
        *,
        pixel_values: Tensor | None = None,
        image_tokens: Tensor | None = None,
        prompts: list[str] | None = None,
        max_length: int = 32,
        prefix_lm: bool = False,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """The language-modelling loss of `texts` given the images (and optional prompts, which an
        instruction-aware Q-Former reads too)."""
        instructions = self._instructions(prompts, _num_images(pixel_values, image_tokens))
        soft = self.soft_prompt(pixel_values=pixel_values, image_tokens=image_tokens, instructions=instructions)
        if len(texts) != soft.shape[0]:
            raise ValueError(f"{soft.shape[0]} images but {len(texts)} texts: need one text per image.")
        inputs = self.language.training_inputs(
            soft, texts, prompts, max_length=max_length, prefix_lm=prefix_lm, generator=generator
        )
        return {"loss": self.language(**inputs)}

    @torch.no_grad()
    def generate(
        self,
        *,
        pixel_values: Tensor | None = None,
        image_tokens: Tensor | None = None,
        prompts: list[str] | None = None,
        **generation: Any,
    ) -> list[str]:
        """Captions (or answers, with prompts) for a batch of images; decoding settings go to the
        language bridge (num_beams=5, max_new_tokens=30, min_new_tokens=1 by default). An
        instruction-aware Q-Former reads the prompts too."""
        b = _num_images(pixel_values, image_tokens)
        if prompts is None and self.prompt:
            prompts = [self.prompt] * b
        instructions = self._instructions(prompts, b)
        soft = self.soft_prompt(pixel_values=pixel_values, image_tokens=image_tokens, instructions=instructions)
        return self.language.generate(soft, prompts, **generation)

    def answer(
        self,
        questions: list[str],
        *,
        pixel_values: Tensor | None = None,
        image_tokens: Tensor | None = None,
        template: str | None = None,
        **generation: Any,
    ) -> list[str]:
        """Zero-shot VQA as BLIP-2 does it: the question in a prompt template (by default the
        model's `vqa_template`, "Question: {} Short answer:"), short beam search."""
        settings = {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1, **generation}
        prompts = [(template or self.vqa_template).format(q) for q in questions]
        return self.generate(pixel_values=pixel_values, image_tokens=image_tokens, prompts=prompts, **settings)

    # ------------------------------------------------------------------ what trains
    def trainable_state_dict(self, *, adapters: bool = True) -> dict[str, Tensor]:
        """Every parameter that trains, by name. `adapters=False`: without the LoRA adapters in
        the bridges, i.e. `ln_vision`, the Q-Former's query path and `proj` (`model.safetensors`)."""
        return {
            n: p
            for n, p in self.named_parameters()
            if p.requires_grad and (adapters or not n.startswith(BRIDGES))
        }

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def merged(self) -> Stage2Model:
        """For exporters: a copy whose bridges hold plain models with the LoRA adapters merged into
        their weights (`LanguageBridge.merged`, `VisionBridge.merged`), so that `language.model` is
        the transformers LLM and `trainable_state_dict()` holds no adapter; or this model itself
        when it has no adapter. Needs the memory of a second LLM."""
        if not self._adapted():
            return self
        clone = Stage2Model(
            self.config,
            language=self.language.merged(),
            vision=self.vision.merged() if self.vision is not None else None,
            prompt=self.prompt,
            vqa_template=self.vqa_template,
            instruction_aware=self.instruction_aware,
            qformer_tokenizer=self.qformer_tokenizer,
        )
        load_state_dict_strict(clone._own_state_dict(), self._own_state_dict(), source="the adapted model")
        return clone.train(self.training)

    # ------------------------------------------------------------------ checkpoints
    def load_stage1(self, source: str | Path | nn.Module) -> LoadReport:
        """Take `ln_vision` and the Q-Former from a stage-1 checkpoint (directory or model).

        The stage-1 heads are reported as skipped; the projection stays fresh. A Q-Former of another
        shape fails with both sizes named."""
        if isinstance(source, nn.Module):
            state_dict, name = source.state_dict(), type(source).__name__
            theirs = getattr(source, "config", None)
        else:
            config, state_dict = read_model_dir(source)
            if config.get("kind") != "qformer-stage1":
                raise CheckpointError(f"{source} is a {config.get('kind')!r} checkpoint, not a stage-1 one.")
            name, theirs = str(source), QFormerConfig.from_dict(config["qformer"])
        if isinstance(theirs, QFormerConfig):
            self._check_same_architecture(theirs, name)
        report = LoadReport()
        kept = {}
        for key, value in state_dict.items():
            if key.startswith(STAGE1_ONLY):
                report.skipped[key] = "stage-1 head, unused in stage 2"
            else:
                kept[key] = value
        own = self._own_state_dict()
        loaded = load_state_dict_strict(own, kept, strict=True, allow_missing=("proj.",), source=name)
        loaded.skipped.update(report.skipped)
        return loaded

    ARCHITECTURE = (
        "num_layers", "hidden_size", "num_heads", "intermediate_size", "num_query_tokens",
        "cross_attention_freq", "vision_width", "vocab_size", "max_position_embeddings",
    )  # fmt: skip

    def _check_same_architecture(self, theirs: QFormerConfig, name: str) -> None:
        diffs = [
            f"{field}: stage-1 checkpoint {getattr(theirs, field)} vs this model {getattr(self.config, field)}"
            for field in self.ARCHITECTURE
            if getattr(theirs, field) != getattr(self.config, field)
        ]
        if diffs:
            raise CheckpointError(
                f"The stage-1 Q-Former in {name} has another shape than this stage-2 model's:\n  - "
                + "\n  - ".join(diffs)
                + "\nBuild the stage-2 model from the checkpoint's config: Stage2Model.from_stage1(...)."
            )

    @classmethod
    def from_stage1(
        cls,
        directory: str | Path,
        *,
        language: LanguageBridge,
        vision: VisionBridge | None = None,
        instruction_aware: bool = False,
    ) -> tuple[Stage2Model, LoadReport]:
        """A stage-2 model shaped like the stage-1 checkpoint in `directory`, with its weights
        (instruction-aware: also its tokenizer, `tokenizer/`, as the stage-1 recipe saves it)."""
        config, _ = read_model_dir(directory)
        tokenizer = stage1_tokenizer(directory) if instruction_aware else None
        model = cls(QFormerConfig.from_dict(config["qformer"]), language=language, vision=vision,
                    instruction_aware=instruction_aware, qformer_tokenizer=tokenizer)  # fmt: skip
        return model, model.load_stage1(directory)

    def _own_state_dict(self) -> dict[str, Tensor]:
        """Our weights without the frozen bridges' (which come from their own checkpoints)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(BRIDGES)}

    def _adapted(self) -> list[tuple[Any, str]]:
        """(bridge, folder) of each bridge that has a LoRA adapter."""
        bridges = [(self.language, LLM_ADAPTER), (self.vision, VISION_ADAPTER)]
        return [(bridge, folder) for bridge, folder in bridges if bridge is not None and bridge.lora is not None]

    def save_pretrained(self, directory: str | Path, *, vision_spec: dict | None = None) -> Path:
        """`config.json` naming the backbones (and the LoRA settings), `model.safetensors` with the
        trainable weights outside the bridges, each LoRA adapter in its folder (`llm_adapter/`,
        `vision_adapter/`, peft's format), and the LLM's tokenizer files. `vision_spec` names the
        tower of a model trained on cached tokens (which holds none)."""
        vision_lora = self.vision.lora if self.vision is not None else None
        config = {
            "kind": self.KIND,
            "qformer": self.config.to_dict(),
            "vision": vision_spec or (self.vision.spec if self.vision is not None else None),
            "language": self.language.spec,
            "prompt": self.prompt,
            "vqa_template": self.vqa_template,
            "llm_lora": self.language.lora.to_dict() if self.language.lora is not None else None,
            "vision_lora": vision_lora.to_dict() if vision_lora is not None else None,
            "instruction_aware": self.instruction_aware,
        }
        directory = save_model(self.trainable_state_dict(adapters=False), directory, config)
        for bridge, folder in self._adapted():
            bridge.save_adapter(directory / folder)
        self.language.tokenizer.save_pretrained(directory / "tokenizer")
        if self.instruction_aware:
            self.qformer_tokenizer.save_pretrained(directory / QFORMER_TOKENIZER)
        return directory

    def load_trainable_weights(self, directory: str | Path) -> None:
        """Load what `save_pretrained` wrote of the trainable weights, strictly: `model.safetensors`
        and each LoRA adapter folder (this model must have the same adapters)."""
        directory = Path(directory)
        _, state_dict = read_model_dir(directory)
        load_state_dict_strict(self.trainable_state_dict(adapters=False), state_dict, source=str(directory))
        adapted = {folder for _, folder in self._adapted()}
        extra = [f for f in (LLM_ADAPTER, VISION_ADAPTER) if f not in adapted and (directory / f).exists()]
        if extra:
            raise CheckpointError(
                f"{directory} holds LoRA adapters ({', '.join(extra)}) that this model has none of: build it "
                "with the checkpoint's llm_lora / vision_lora (Stage2Model.from_pretrained does)."
            )
        for bridge, folder in self._adapted():
            bridge.load_adapter(directory / folder)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, *, device: torch.device | str | None = None, with_vision: bool = True
    ) -> Stage2Model:
        from bridges.language import LanguageBridge
        from bridges.vision import VisionBridge

        config = read_model_config(directory)
        if config.get("kind") != cls.KIND:
            raise CheckpointError(
                f"{directory} is a {config.get('kind', 'unknown')!r} checkpoint, not a stage-2 one "
                f"({cls.KIND!r}): stage-2 checkpoints come from the stage-2 recipe."
            )
        vision_lora = config.get("vision_lora")
        if vision_lora is not None and not with_vision:
            raise CheckpointError(
                f"{directory} has a LoRA adapter on its vision tower ({VISION_ADAPTER}/), which a model "
                "without the tower would silently drop: load it with with_vision=True (exporters take "
                "the tower and the LLM with their adapters merged in from `model.merged()`)."
            )
        vision = None
        if with_vision and config.get("vision") is not None:
            vision = VisionBridge.from_spec(config["vision"], device=device)
        from transformers import AutoTokenizer

        # the tokenizer saved with the checkpoint, not whatever the LLM's name resolves to today
        tokenizer = AutoTokenizer.from_pretrained(Path(directory) / "tokenizer")
        language = LanguageBridge.from_spec(config["language"], tokenizer=tokenizer, device=device)
        instruction_aware = bool(config.get("instruction_aware", False))  # absent: saved before the option
        qformer_tokenizer = None
        if instruction_aware:
            path = Path(directory) / QFORMER_TOKENIZER
            if not (path / "tokenizer_config.json").is_file():
                raise CheckpointError(
                    f"{directory} is instruction-aware but has no Q-Former tokenizer in {path}: save the "
                    "model with Stage2Model.save_pretrained, which writes it."
                )
            qformer_tokenizer = AutoTokenizer.from_pretrained(path)
        model = cls(
            QFormerConfig.from_dict(config["qformer"]),
            language=language,
            vision=vision,
            prompt=config.get("prompt"),
            vqa_template=config.get("vqa_template", VQA_PROMPT),
            llm_lora=config.get("llm_lora"),
            vision_lora=vision_lora,
            instruction_aware=instruction_aware,
            qformer_tokenizer=qformer_tokenizer,
        )
        model.load_trainable_weights(directory)
        return model.to(device) if device is not None else model


def _num_images(pixel_values: Tensor | None, image_tokens: Tensor | None) -> int:
    if (pixel_values is None) == (image_tokens is None):
        raise ValueError("Give exactly one of `pixel_values` and `image_tokens`.")
    return (pixel_values if pixel_values is not None else image_tokens).shape[0]


def stage1_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    """The Q-Former tokenizer a stage-1 checkpoint was trained with (its `tokenizer/` folder)."""
    from transformers import AutoTokenizer

    path = Path(directory) / "tokenizer"
    if not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"{path} not found: an instruction-aware stage 2 reads instructions with the stage-1 "
            "Q-Former's tokenizer, which the stage-1 recipe saves there. Copy the tokenizer stage 1 was "
            "trained with into it (`tokenizer.save_pretrained(...)`), or set `tokenizer` in the stage-2 config."
        )
    return AutoTokenizer.from_pretrained(path)


def _check_qformer_tokenizer(tokenizer: PreTrainedTokenizerBase | None, config: QFormerConfig) -> None:
    if tokenizer is None:
        raise ValueError(
            "instruction_aware=True reads each prompt with the Q-Former's own tokenizer, but none was "
            "given: pass `qformer_tokenizer=` (the one stage 1 was trained with, in its checkpoint's "
            "tokenizer/ folder; Stage2Model.from_stage1 loads it)."
        )
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"The Q-Former tokenizer has {len(tokenizer)} tokens but the Q-Former's word embeddings only "
            f"{config.vocab_size} rows (QFormerConfig.vocab_size): use the tokenizer the Q-Former was built with."
        )
