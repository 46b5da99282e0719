"""Stage 2, generative learning: frozen vision tower -> Q-Former -> Linear -> frozen LLM.

The query outputs (b, q, d) pass through one linear layer into the LLM's width and go in front of
the LLM's own input embeddings as a soft visual prompt. What trains is declared here and checked by
the tests: `ln_vision`, the Q-Former's query path and `proj`. The Q-Former's text-only parts (word
and position embeddings, the text FFN) take no part in stage 2 and are frozen, so the optimizer
sees exactly what learns; the vision tower and the LLM are frozen inside their bridges.

Legend: b batch, q queries, n image tokens, d Q-Former width, d_v vision width, d_llm LLM width.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from qformer.checkpoint import (
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
    from bridges.vision import VisionBridge

VQA_PROMPT = "Question: {} Short answer:"

# Stage-1 weights that stage 2 has no use for: the ITC/ITM/ITG heads and the temperature.
STAGE1_ONLY = ("vision_proj.", "text_proj.", "itm_head.", "lm_head.", "temp")


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
    ) -> None:
        """`vision` may be None when training from cached tower tokens (`image_tokens=`).
        `prompt`: the text after the soft prompt that captions were trained with (used by
        `generate` when no prompts are given); `vqa_template`: how `answer` asks questions."""
        super().__init__()
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
    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

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
        return {
            k: v
            for k, v in self.state_dict().items()
            if not k.startswith(("vision.", "language."))
        }

    def save_pretrained(self, directory: str | Path, *, vision_spec: dict | None = None) -> Path:
        """`config.json` naming the backbones, `model.safetensors` with the trainable weights only,
        and the LLM's tokenizer files. `vision_spec` names the tower of a model trained on cached
        tokens (which holds none)."""
        config = {
            "kind": self.KIND,
            "qformer": self.config.to_dict(),
            "vision": vision_spec or (self.vision.spec if self.vision is not None else None),
            "language": self.language.spec,
            "prompt": self.prompt,
            "vqa_template": self.vqa_template,
        }
        directory = save_model(self.trainable_state_dict(), directory, config)
        self.language.tokenizer.save_pretrained(directory / "tokenizer")
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, *, device: torch.device | str | None = None, with_vision: bool = True
    ) -> Stage2Model:
        from bridges.language import LanguageBridge
        from bridges.vision import VisionBridge

        config, state_dict = read_model_dir(directory)
        if config.get("kind") != cls.KIND:
            raise CheckpointError(
                f"{directory} is a {config.get('kind', 'unknown')!r} checkpoint, not a stage-2 one "
                f"({cls.KIND!r}): stage-2 checkpoints come from the stage-2 recipe."
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
        )
        load_state_dict_strict(
            model.trainable_state_dict(), state_dict, source=str(directory)
        )
        return model.to(device) if device is not None else model

