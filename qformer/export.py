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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from qformer.checkpoint import CheckpointError, load_state_dict_strict
from qformer.config import QFormerConfig
from qformer.model import QFormer

MANIFEST = "soft_prompt.json"
FORMAT = "qformer-soft-prompt"


def export_soft_prompt(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the soft-prompt artifact of a stage-2 checkpoint to `out`."""
    from qformer.evaluate import load_stage2

    model = load_stage2(checkpoint)  # names a non-stage-2 checkpoint in its error
    if model.vision is None:
        raise CheckpointError(f"{checkpoint} names no vision tower: the artifact needs one to read images.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v for k, v in model.trainable_state_dict().items()}  # ln_vision, query path, proj
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(out / "model.safetensors"))
    language = model.language
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
        "num_query_tokens": model.config.num_query_tokens,
        "qformer_width": model.config.hidden_size,
        "llm_width": language.hidden_size,
        "qformer": model.config.to_dict(),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


class SoftVisualPrompt(nn.Module):
    """Images -> (inputs_embeds (b, q, d_llm), attention_mask (b, q)) for an unmodified LLM."""

    def __init__(self, manifest: dict[str, Any], vision) -> None:
        super().__init__()
        config = QFormerConfig.from_dict(manifest["qformer"])
        self.manifest = manifest
        self.vision = vision
        self.ln_vision = nn.LayerNorm(config.vision_width, eps=config.vision_layer_norm_eps)
        self.qformer = QFormer(config)
        self.proj = nn.Linear(config.hidden_size, manifest["llm_width"])
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
        model = cls(manifest, VisionBridge.from_spec(manifest["vision"], device=device))
        weights = load_file(str(directory / "model.safetensors"))
        from qformer.stage2 import text_only_prefixes

        own = {k: v for k, v in model.state_dict().items() if not k.startswith("vision.")}
        # the Q-Former's text-only parts take no part in a soft prompt and are not exported
        load_state_dict_strict(own, weights, source=str(directory), allow_missing=text_only_prefixes(model.qformer.config))
        return model.to(device) if device is not None else model

    @property
    def transform(self):
        return self.vision.eval_transform()

    @torch.no_grad()
    def forward(self, images) -> tuple[Tensor, Tensor]:
        """`images`: PIL images, or pixels (b, 3, H, W) already transformed."""
        if not isinstance(images, Tensor):
            from bridges.vision import to_rgb

            images = torch.stack([self.transform(to_rgb(image)) for image in images])
        tokens = self.ln_vision(self.vision(images).float())  # (b, n, d_v)
        queries = self.qformer(image_embeds=tokens).query_output  # (b, q, d)
        soft = self.proj(queries)  # (b, q, d_llm)
        return soft, torch.ones(soft.shape[:2], dtype=torch.long, device=soft.device)
