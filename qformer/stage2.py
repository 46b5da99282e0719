"""Stage 2, generative learning: frozen vision tower -> Q-Former -> Linear -> frozen LLM.

The query outputs (b, q, d) pass through one linear layer into the LLM's width and go in front of
the LLM's own input embeddings as a soft visual prompt. What trains is declared here and checked by
the tests: `ln_vision`, the Q-Former's query path and `proj`. The Q-Former's text-only parts (word
and position embeddings, the text FFN) take no part in stage 2 and are frozen, so the optimizer
sees exactly what learns; the vision tower and the LLM are frozen inside their bridges. Optionally
(`llm_lora=`, `vision_lora=`) a LoRA adapter on the LLM and/or the tower trains as well: their own
weights stay frozen, the adapter is saved beside the Q-Former in peft's format (`llm_adapter/`,
`vision_adapter/`) and reloaded by `from_pretrained`.

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
    from bridges.language import LanguageBridge
    from bridges.lora import LoraSettings
    from bridges.vision import VisionBridge

VQA_PROMPT = "Question: {} Short answer:"
LLM_ADAPTER = "llm_adapter"  # the LoRA adapters' folders in a checkpoint, in peft's format
VISION_ADAPTER = "vision_adapter"
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
    ) -> None:
        """`vision` may be None when training from cached tower tokens (`image_tokens=`).
        `prompt`: the text after the soft prompt that captions were trained with (used by
        `generate` when no prompts are given); `vqa_template`: how `answer` asks questions.
        `llm_lora` / `vision_lora`: {r, alpha, dropout, target_modules} of a LoRA adapter that
        this constructor puts on the given bridge (in place; see `bridges.lora`), None for none."""
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
        self.config = config
        self.prompt = prompt
        self.vqa_template = vqa_template
        self.vision = vision  # frozen (inside the bridge)
        self.ln_vision = nn.LayerNorm(config.vision_width, eps=config.vision_layer_norm_eps)
        self.qformer = QFormer(config)
        self.proj = nn.Linear(config.hidden_size, language.hidden_size)
        self.language = language  # frozen (inside the bridge)
        for name, p in self.named_parameters():
            if name.startswith(text_only_prefixes(config)):
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

    def soft_prompt(self, *, pixel_values: Tensor | None = None, image_tokens: Tensor | None = None) -> Tensor:
        """Images -> the soft visual prompt (b, q, d_llm)."""
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
        queries = self.qformer(image_embeds=image).query_output  # (b, q, d)
        return self.proj(queries)  # (b, q, d_llm)

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
        """The language-modelling loss of `texts` given the images (and optional prompts)."""
        soft = self.soft_prompt(pixel_values=pixel_values, image_tokens=image_tokens)
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
        language bridge (num_beams=5, max_new_tokens=30, min_new_tokens=1 by default)."""
        soft = self.soft_prompt(pixel_values=pixel_values, image_tokens=image_tokens)
        if prompts is None and self.prompt:
            prompts = [self.prompt] * soft.shape[0]
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
        cls, directory: str | Path, *, language: LanguageBridge, vision: VisionBridge | None = None
    ) -> tuple[Stage2Model, LoadReport]:
        """A stage-2 model shaped like the stage-1 checkpoint in `directory`, with its weights."""
        config, _ = read_model_dir(directory)
        model = cls(QFormerConfig.from_dict(config["qformer"]), language=language, vision=vision)
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
        }
        directory = save_model(self.trainable_state_dict(adapters=False), directory, config)
        for bridge, folder in self._adapted():
            bridge.save_adapter(directory / folder)
        self.language.tokenizer.save_pretrained(directory / "tokenizer")
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
        model = cls(
            QFormerConfig.from_dict(config["qformer"]),
            language=language,
            vision=vision,
            prompt=config.get("prompt"),
            vqa_template=config.get("vqa_template", VQA_PROMPT),
            llm_lora=config.get("llm_lora"),
            vision_lora=vision_lora,
        )
        model.load_trainable_weights(directory)
        return model.to(device) if device is not None else model

