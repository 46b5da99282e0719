"""Take a trained Q-Former out: the soft visual prompt artifact for an unmodified LLM.

    qformer export --checkpoint runs/stage2/model --format soft-prompt --out soft_prompt/

writes `soft_prompt.json` (vision tower and layer, LLM name, number of queries, widths, image
transform, end-of-text token, the caption prompt) and `model.safetensors` (`ln_vision`, the
Q-Former's query path, the projection). `SoftVisualPrompt.from_pretrained(OUT)` turns images into
`inputs_embeds` and `attention_mask` to put in front of the LLM's own input embeddings:

    svp = SoftVisualPrompt.from_pretrained("soft_prompt/")
    llm = AutoModelForCausalLM.from_pretrained(svp.manifest["llm"]); tok = AutoTokenizer.from_pretrained(...)
    soft, mask = svp([Image.open("dog.jpg")])                          # (1, q, d_llm), (1, q)
    ids = tok(svp.manifest["prompt"] or "", return_tensors="pt").input_ids   # BOS (+ prompt)
    embeds = torch.cat([soft, llm.get_input_embeddings()(ids)], dim=1)
    out = llm.generate(inputs_embeds=embeds, attention_mask=torch.cat([mask, torch.ones_like(ids)], 1),
                       eos_token_id=svp.manifest["eos_token_id"], max_new_tokens=30)

A checkpoint trained with `llm_lora` has no unmodified LLM to serve: its LoRA adapter is written
beside the prompt (`llm_adapter/`, peft's format), the manifest names it (`llm_adapter`, null
otherwise), and the LLM must be loaded with it, or the soft prompt meets an LLM it was not trained
with:

    if svp.llm_adapter is not None:
        llm = PeftModel.from_pretrained(llm, svp.llm_adapter)   # or .merge_and_unload() after it

A vision-tower adapter (`vision_lora`) is part of the artifact (`vision_adapter/`) and
`SoftVisualPrompt` applies it itself.

An instruction-aware checkpoint's soft prompt depends on the text prompt the LLM reads after it:
the artifact then holds the Q-Former's tokenizer (`qformer_tokenizer/`), the manifest says
`instruction_aware: true`, and `svp(images, instructions=[prompt, ...])` takes the prompts ("" for
none; the caption prompt, or the question in the manifest's `vqa_template`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from qformer.checkpoint import CheckpointError, load_state_dict_strict
from qformer.config import QFormerConfig
from qformer.model import QFormer
from qformer.stage2 import LLM_ADAPTER, QFORMER_TOKENIZER, VISION_ADAPTER, tokenize_instructions

MANIFEST = "soft_prompt.json"
FORMAT = "qformer-soft-prompt"
LLM_ADAPTER_NOTE = (
    "This soft prompt was trained with a LoRA adapter on the LLM: load the LLM with it, "
    "PeftModel.from_pretrained(llm, '<this folder>/llm_adapter'), or the LLM is not the one it was trained with."
)


def export_soft_prompt(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the soft-prompt artifact of a stage-2 checkpoint to `out`."""
    from qformer.evaluate import load_stage2

    model = load_stage2(checkpoint)  # names a non-stage-2 checkpoint in its error
    if model.vision is None:
        raise CheckpointError(f"{checkpoint} names no vision tower: the artifact needs one to read images.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = model.trainable_state_dict(adapters=False)  # ln_vision, query path, proj
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(out / "model.safetensors"))
    language = model.language
    # adapters in peft's format beside the prompt: the tower's is applied by `SoftVisualPrompt`, the
    # LLM's is the user's to load (the manifest and a warning say so)
    if model.vision.lora is not None:
        model.vision.save_adapter(out / VISION_ADAPTER)
    if language.lora is not None:
        language.save_adapter(out / LLM_ADAPTER)
        warnings.warn(LLM_ADAPTER_NOTE.replace("<this folder>", str(out)), stacklevel=2)
    if model.instruction_aware:
        model.qformer_tokenizer.save_pretrained(out / QFORMER_TOKENIZER)
    manifest = {
        "format": FORMAT,
        "vision": model.vision.spec,
        "image_size": model.vision.image_size,
        "mean": list(model.vision.mean),
        "std": list(model.vision.std),
        "llm": language.spec["name"],
        "end_of_text": language.spec["end_of_text"],
        "eos_token_id": language.end_token_id,
        "prompt": model.prompt,
        "vqa_template": model.vqa_template,
        # the Q-Former reads the LLM's prompt too: pass it as `instructions=`
        "instruction_aware": model.instruction_aware,
        "num_query_tokens": model.config.num_query_tokens,
        "qformer_width": model.config.hidden_size,
        "llm_width": language.hidden_size,
        "qformer": model.config.to_dict(),
        # the LLM's LoRA adapter (a folder in this artifact), or null: the LLM is used unmodified
        "llm_adapter": LLM_ADAPTER if language.lora is not None else None,
        "llm_lora": language.lora.to_dict() if language.lora is not None else None,
        "vision_adapter": VISION_ADAPTER if model.vision.lora is not None else None,
        "vision_lora": model.vision.lora.to_dict() if model.vision.lora is not None else None,
    }
    if language.lora is not None:
        manifest["note"] = LLM_ADAPTER_NOTE
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


class SoftVisualPrompt(nn.Module):
    """Images -> (inputs_embeds (b, q, d_llm), attention_mask (b, q)) for the LLM the prompt was
    trained with: the unmodified LLM, or with the LoRA adapter at `llm_adapter` when there is one."""

    def __init__(self, manifest: dict[str, Any], vision, *, directory: Path | None = None) -> None:
        super().__init__()
        config = QFormerConfig.from_dict(manifest["qformer"])
        self.manifest = manifest
        self.directory = directory
        self.vision = vision
        self.ln_vision = nn.LayerNorm(config.vision_width, eps=config.vision_layer_norm_eps)
        self.qformer = QFormer(config)
        self.proj = nn.Linear(config.hidden_size, manifest["llm_width"])
        self.instruction_aware = bool(manifest.get("instruction_aware", False))
        self.qformer_tokenizer = None  # set by `from_pretrained` when instruction-aware
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device: str | torch.device | None = None) -> SoftVisualPrompt:
        from bridges.vision import VisionBridge

        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: make the artifact with `qformer export --format soft-prompt`.")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a soft-prompt manifest (format {manifest.get('format')!r}).")
        vision = VisionBridge.from_spec(manifest["vision"], device=device)
        if manifest.get("vision_adapter"):
            vision.add_lora(manifest["vision_lora"], key="vision_lora")
            vision.load_adapter(directory / manifest["vision_adapter"])
        model = cls(manifest, vision, directory=directory)
        weights = load_file(str(directory / "model.safetensors"))
        from qformer.stage2 import unused_prefixes

        own = {k: v for k, v in model.state_dict().items() if not k.startswith("vision.")}
        # the Q-Former parts that cannot reach the soft prompt are not exported
        unused = unused_prefixes(model.qformer.config, instruction_aware=model.instruction_aware)
        load_state_dict_strict(own, weights, source=str(directory), allow_missing=unused)
        if model.instruction_aware:
            from transformers import AutoTokenizer

            model.qformer_tokenizer = AutoTokenizer.from_pretrained(directory / QFORMER_TOKENIZER)
        return model.to(device) if device is not None else model

    @property
    def llm_adapter(self) -> Path | None:
        """The folder of the LLM's LoRA adapter (peft's format), which the LLM must be loaded with;
        None when the soft prompt is for the unmodified LLM."""
        name = self.manifest.get("llm_adapter")
        if name is None:
            return None
        return (self.directory / name) if self.directory is not None else Path(name)

    @property
    def transform(self):
        return self.vision.eval_transform()

    @torch.no_grad()
    def forward(self, images, instructions: list[str] | None = None) -> tuple[Tensor, Tensor]:
        """`images`: PIL images, or pixels (b, 3, H, W) already transformed. `instructions`: one
        per image, the prompt the LLM reads after the soft prompt; required when the manifest says
        `instruction_aware`, refused otherwise."""
        if self.instruction_aware != (instructions is not None):
            raise ValueError(
                "This soft prompt is instruction-aware: pass `instructions=` (one prompt per image, \"\" for none)."
                if self.instruction_aware
                else "This soft prompt reads no instructions (instruction_aware is false): leave `instructions` out."
            )
        if not isinstance(images, Tensor):
            from bridges.vision import to_rgb

            images = torch.stack([self.transform(to_rgb(image)) for image in images])
        tokens = self.ln_vision(self.vision(images).float())  # (b, n, d_v)
        if instructions is None:
            queries = self.qformer.forward_queries(tokens)  # (b, q, d)
        else:
            ids, mask = tokenize_instructions(
                self.qformer_tokenizer, instructions, max_length=self.qformer.config.max_position_embeddings
            )  # (b, t), (b, t)
            queries = self.qformer.forward_queries(
                tokens, instruction_ids=ids.to(tokens.device), instruction_mask=mask.to(tokens.device)
            )
        soft = self.proj(queries)  # (b, q, d_llm)
        return soft, torch.ones(soft.shape[:2], dtype=torch.long, device=soft.device)
