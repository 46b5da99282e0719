"""Vision bridge: a frozen image tower that turns pixels into tokens [b, n, d], and its transforms.

BLIP-2 reads the image through a frozen ViT whose last block is dropped and which has no final
norm: the Q-Former cross-attends to the output of the *penultimate* block, class token included
(257 tokens for EVA ViT-g/14 at 224 px). `VisionBridge` gives exactly that for

* open_clip models (`from_open_clip`): open_clip's own `VisionTransformer`, and timm towers wrapped
  in open_clip's `TimmModel` (the EVA configs, e.g. "EVA01-g-14", the original BLIP-2 tower);
* transformers vision models (`from_transformers`): CLIP, SigLIP, DINOv2, ... (any checkpoint
  whose vision part `AutoModel` knows), two-tower checkpoints included (only the vision tower loads).

`layer` indexes the tower's blocks like a Python list: -2 (the default) is the penultimate block,
0 the first. Blocks after the chosen one are pruned where the library allows it, so they cost
neither memory nor time.

The tower is frozen for real: no parameter requires grad, the forward runs under `no_grad`, and it
stays in eval mode (no dropout, drop-path or patch dropout) even when the model that holds it is
put in train mode. It computes in `compute_dtype` (autocast) and returns tokens in that dtype;
the trainable `ln_vision` that follows upcasts them. `trainable=True` is for BLIP, which trains its
ViT: the parameters then require grad, the forward keeps the graph and train/eval mode follows
the parent. `add_lora` keeps the tower frozen but adapts some of its Linear layers with LoRA (peft,
see `bridges.lora`): only the adapter trains, and the forward keeps the graph for it.

Image transforms live outside the module (`train_transform`, `eval_transform`, `to_rgb`,
`load_image`), so that data loaders can build them without the weights.

Legend: b batch, n image tokens (prefix/class tokens first, then patches), d tower width,
S image side in pixels.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor, nn
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from bridges import lora
from bridges.dtypes import default_compute_dtype, resolve_compute_dtype

Source = Literal["open_clip", "transformers"]
SOURCES: tuple[str, ...] = ("open_clip", "transformers")

# Normalisation constants of the common towers, for transformers checkpoints saved without an
# image processor (the processor's values win whenever `preprocessor_config.json` exists).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_NORMALIZATION = {  # transformers `model_type` -> (mean, std)
    "clip_vision_model": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "siglip_vision_model": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dinov2": (IMAGENET_MEAN, IMAGENET_STD),
}


def _block_index(layer: int, num_blocks: int, what: str) -> int:
    """`layer` as a non-negative block index. Pruning shortens the block list, after which a
    negative index would point at a different block, so the bridge keeps only this one."""
    if not -num_blocks <= layer < num_blocks:
        raise ValueError(
            f"layer={layer} is out of range for {what}, which has {num_blocks} blocks: "
            f"use -{num_blocks}..{num_blocks - 1} (-2 = the penultimate block, as BLIP-2)."
        )
    return layer % num_blocks


def _square_side(size: Any, what: str) -> int:
    """An image side from the size formats of open_clip (int or (h, w)) and of transformers'
    image processors ({"height", "width"} or {"shortest_edge"})."""
    if isinstance(size, dict):
        if "height" in size:
            size = (size["height"], size.get("width", size["height"]))
        else:
            size = size["shortest_edge"]
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ValueError(
                f"{what} has a non-square image size {tuple(size)}; only square towers are supported."
            )
        size = size[0]
    return int(size)


# Default LoRA targets: the first set whose every name is a Linear layer of the tower.
VISION_LORA_TARGETS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "v_proj"),  # transformers CLIP, SigLIP attention
    ("query", "value"),  # transformers ViT, DINOv2 attention
    # open_clip's ViT: its attention is an nn.MultiheadAttention, which peft cannot adapt with the
    # frozen weights kept exact (`bridges.lora.wrap`), so the MLP
    ("mlp.c_fc", "mlp.c_proj"),
    ("mlp.fc1", "mlp.fc2"),  # timm ViT/EVA, BLIP-2's vision model
    ("mlp.fc1_g", "mlp.fc1_x", "mlp.fc2"),  # timm EVA-02 (SwiGLU)
)


# --------------------------------------------------------------------------------------------
# The bridge
# --------------------------------------------------------------------------------------------


class VisionBridge(nn.Module):
    """A frozen vision tower: pixels (b, 3, S, S) -> tokens (b, n, d) of one block.

    Build it with `from_open_clip`, `from_transformers` or `from_spec`; the constructor takes an
    already prepared (pruned) tower.
    """

    def __init__(
        self,
        tower: nn.Module,
        *,
        source: Source,
        block: int,
        width: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        spec: dict[str, Any],
        compute_dtype: torch.dtype | None = None,
        num_prefix_tokens: int = 1,
        trainable: bool = False,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"source={source!r}: expected one of {SOURCES}.")
        self.tower = tower
        self.source = source
        self.block = block  # non-negative index of the block whose output is returned
        self.width = width
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.spec = dict(spec)
        self._compute_dtype = (
            None if compute_dtype is None else resolve_compute_dtype(compute_dtype, next(tower.parameters()).device)
        )
        self._num_prefix_tokens = num_prefix_tokens
        self._num_tokens: int | None = None
        self.trainable = trainable
        self.lora: lora.LoraSettings | None = None  # set by `add_lora`
        self.tower.requires_grad_(trainable)
        self.train(False)

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def from_open_clip(
        cls,
        model_name: str,
        pretrained: str | None = None,
        *,
        layer: int = -2,
        device: str | torch.device | None = None,
        compute_dtype: torch.dtype | None = None,
        trainable: bool = False,
    ) -> VisionBridge:
        """An open_clip model's vision tower, e.g. ("EVA01-g-14", "laion400m_s11b_b41k") or
        ("ViT-L-14", "openai"). `pretrained` is an open_clip tag or a local weights file of the
        whole CLIP model (.safetensors, .bin, .pt; loaded strictly by open_clip); None gives
        random weights. Works for open_clip's `VisionTransformer` and for timm ViT/EVA towers.
        `model_name` may also be the path of an open_clip model config (`NAME.json`): it is
        registered first, so a checkpoint naming it loads in any process."""
        import open_clip
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer

        spec_name = model_name
        if model_name.endswith(".json") and os.path.isfile(model_name):
            spec_name = os.path.abspath(model_name)
            open_clip.add_model_config(spec_name)  # registered under the file's stem
            model_name = os.path.splitext(os.path.basename(spec_name))[0]

        is_tag = pretrained is not None and open_clip.get_pretrained_cfg(model_name, pretrained)
        if pretrained is not None and not is_tag and os.path.isfile(pretrained):
            pretrained = os.path.abspath(pretrained)  # the spec must still work from another cwd
        # Built on the CPU: the text tower is dropped right away and only the vision tower moves.
        model = open_clip.create_model(model_name, pretrained=pretrained)
        visual = model.visual
        preprocess = visual.preprocess_cfg  # set by create_model: size, mean, std of the weights
        del model

        if isinstance(visual, VisionTransformer):
            num_blocks = len(visual.transformer.resblocks)
            block = _block_index(layer, num_blocks, f"open_clip model {model_name!r}")
            # The final norm (ln_post) and projection are unused: BLIP-2 reads un-normalised
            # block outputs. forward_intermediates never applies them with its defaults anyway.
            visual.prune_intermediate_layers([block], prune_norm=True, prune_head=True)
            width = visual.transformer.width
            num_prefix_tokens = 1  # open_clip's ViT always has exactly one class token
        elif isinstance(visual, TimmModel):
            trunk = visual.trunk
            if not (hasattr(trunk, "blocks") and hasattr(trunk, "prune_intermediate_layers")):
                raise ValueError(
                    f"open_clip model {model_name!r} has a timm {type(trunk).__name__} tower without a "
                    "list of ViT blocks; use a ViT/EVA tower."
                )
            block = _block_index(layer, len(trunk.blocks), f"open_clip model {model_name!r}")
            trunk.prune_intermediate_layers([block], prune_norm=True, prune_head=True)
            # open_clip's pooling/projection head after the trunk is unused as well.
            visual.head = nn.Identity()
            width = trunk.embed_dim
            num_prefix_tokens = trunk.num_prefix_tokens
        else:
            raise ValueError(
                f"open_clip model {model_name!r} has a {type(visual).__name__} vision tower; only "
                "ViT towers (open_clip VisionTransformer, timm ViT/EVA) give image tokens."
            )

        if device is not None:
            visual.to(device)
        spec = {"source": "open_clip", "name": spec_name, "pretrained": pretrained, "layer": layer}
        return cls(
            visual,
            source="open_clip",
            block=block,
            width=width,
            image_size=_square_side(preprocess["size"], f"open_clip model {model_name!r}"),
            mean=preprocess["mean"],
            std=preprocess["std"],
            spec=spec,
            compute_dtype=compute_dtype,
            num_prefix_tokens=num_prefix_tokens,
            trainable=trainable,
        )

    @classmethod
    def from_transformers(
        cls,
        name_or_path: str,
        *,
        layer: int = -2,
        device: str | torch.device | None = None,
        compute_dtype: torch.dtype | None = None,
        trainable: bool = False,
    ) -> VisionBridge:
        """A transformers vision model (hub name or local folder): CLIPVisionModel,
        SiglipVisionModel, DINOv2, ...; a two-tower checkpoint (CLIP, SigLIP) loads its vision
        tower only. Image size, mean and std come from the image processor saved with it
        (`preprocessor_config.json`), else from the model config and the tower's usual values."""
        from transformers import AutoConfig, AutoModel
        from transformers.image_processing_base import ImageProcessingMixin
        from transformers.models.auto.modeling_auto import MODEL_MAPPING

        if os.path.isdir(name_or_path):
            name_or_path = os.path.abspath(name_or_path)
        config = AutoConfig.from_pretrained(name_or_path)
        vision_config = getattr(config, "vision_config", None)
        if config.model_type == "blip_2_vision_model":
            # AutoModel maps no BLIP-2 vision tower on its own; `qformer import --from hf-blip2`
            # saves one so (see qformer/hf_blip2.py)
            from transformers import Blip2VisionModel

            model_class = Blip2VisionModel
        elif vision_config is None:
            model_class = AutoModel
        elif type(vision_config) in MODEL_MAPPING:
            model_class = MODEL_MAPPING[type(vision_config)]  # e.g. CLIPVisionConfig -> CLIPVisionModel
        else:
            raise ValueError(
                f"{name_or_path}: no transformers model class for its vision tower "
                f"({type(vision_config).__name__})."
            )
        model, info = model_class.from_pretrained(name_or_path, output_loading_info=True)
        # Unexpected keys are expected (the text tower of a two-tower checkpoint); missing ones
        # would mean randomly initialised vision weights.
        if info["missing_keys"]:
            raise ValueError(
                f"{name_or_path}: the vision tower's weights are incomplete; missing "
                f"{sorted(info['missing_keys'])}."
            )
        tower_config = model.config
        num_blocks = tower_config.num_hidden_layers
        block = _block_index(layer, num_blocks, name_or_path)
        _prune_transformers_blocks(model, num_blocks, block)

        try:
            processor, _ = ImageProcessingMixin.get_image_processor_dict(name_or_path)
        except OSError:  # no preprocessor_config.json saved with the model
            processor = None
        if processor is not None:
            size = processor["crop_size"] if processor.get("do_center_crop") else processor["size"]
            image_size = _square_side(size, name_or_path)
            mean, std = processor["image_mean"], processor["image_std"]
        else:
            image_size = _square_side(tower_config.image_size, name_or_path)
            if tower_config.model_type not in DEFAULT_NORMALIZATION:
                raise ValueError(
                    f"{name_or_path} has no preprocessor_config.json and the mean/std of a "
                    f"{tower_config.model_type!r} tower are unknown here: save its image processor "
                    "beside the model (image_processor.save_pretrained(dir))."
                )
            mean, std = DEFAULT_NORMALIZATION[tower_config.model_type]

        if device is not None:
            model.to(device)
        spec = {"source": "transformers", "name": name_or_path, "pretrained": None, "layer": layer}
        return cls(
            model,
            source="transformers",
            block=block,
            width=tower_config.hidden_size,
            image_size=image_size,
            mean=mean,
            std=std,
            spec=spec,
            compute_dtype=compute_dtype,
            trainable=trainable,
        )

    @classmethod
    def from_spec(
        cls,
        spec: dict[str, Any],
        *,
        device: str | torch.device | None = None,
        compute_dtype: torch.dtype | None = None,
        trainable: bool = False,
    ) -> VisionBridge:
        """Rebuild a bridge from its `spec` (as stored in a checkpoint's config)."""
        source, name, layer = spec.get("source"), spec.get("name"), spec.get("layer", -2)
        problems = []
        if source not in SOURCES:
            problems.append(f"source={source!r}: expected one of {SOURCES}")
        if not isinstance(name, str) or not name:
            problems.append(f"name={name!r}: expected a model name or path")
        if not isinstance(layer, int):
            problems.append(f"layer={layer!r}: expected a block index (int)")
        if problems:
            raise ValueError("invalid vision spec:\n  - " + "\n  - ".join(problems))
        if source == "open_clip":
            return cls.from_open_clip(
                name,
                spec.get("pretrained"),
                layer=layer,
                device=device,
                compute_dtype=compute_dtype,
                trainable=trainable,
            )
        return cls.from_transformers(
            name, layer=layer, device=device, compute_dtype=compute_dtype, trainable=trainable
        )

    # ---- frozen for real --------------------------------------------------------------------

    def train(self, mode: bool = True) -> VisionBridge:
        """Always eval when frozen: a parent's `.train()` must not switch on the tower's dropout,
        drop-path or patch dropout (open_clip's patch dropout would even change the number of
        tokens). A trainable tower follows `mode`; so does a LoRA adapter's dropout (alone)."""
        super().train(mode and self.trainable)
        if self.lora is not None:
            lora.set_dropout(self.tower, mode)
        return self

    # ---- LoRA -------------------------------------------------------------------------------

    def add_lora(self, settings: lora.LoraSettings | dict[str, Any], *, key: str = "lora") -> lora.LoraSettings:
        """Put a LoRA adapter on the frozen tower, in place: its A and B matrices train, every
        weight of the tower stays frozen. `target_modules` None takes the first set of
        `VISION_LORA_TARGETS` the tower has (open_clip ViT: mlp.c_fc, mlp.c_proj; transformers
        CLIP: q_proj, v_proj). One blank image checks that every adapted layer takes part in the
        forward. Returns the settings with the targets filled in; `key` names the setting in errors."""
        settings = lora.LoraSettings.from_value(settings, key=key)
        what = f"the vision tower {self.spec.get('name')!r}"
        if self.trainable:
            raise ValueError(f"{what} trains whole (trainable=True); LoRA is for a frozen tower: drop one of them.")
        if self.lora is not None:
            raise ValueError(f"{what} already has a LoRA adapter; add one adapter only.")
        if settings.target_modules is None:
            found = [names for names in VISION_LORA_TARGETS if all(lora.has_module(self.tower, n) for n in names)]
            if not found:
                raise ValueError(
                    f"No default LoRA layers for {what}: set `{key}.target_modules`, e.g. to some of its "
                    f"Linear layers: {lora.linear_names(self.tower)}."
                )
            settings = settings.with_targets(found[0])
        self.tower = lora.wrap(self.tower, settings, task_type=None, key=key, what=what)
        self.lora = settings
        idle = self._idle_adapters()
        if idle:
            self.tower, self.lora = lora.unwrap(self.tower), None
            raise ValueError(
                f"`{key}.target_modules` picks layers of {what} whose forward never runs ({', '.join(idle[:3])}"
                f"{', ...' if len(idle) > 3 else ''}): the tower uses their weights directly, so an adapter "
                "there would be ignored. Target other Linear layers."
            )
        return settings

    def _idle_adapters(self) -> list[str]:
        """The adapted layers that one blank image's forward does not call."""
        from peft.tuners.lora import LoraLayer

        layers = {name: m for name, m in self.tower.get_base_model().named_modules() if isinstance(m, LoraLayer)}
        ran: set[str] = set()
        hooks = [m.register_forward_hook(lambda *_, name=name: ran.add(name)) for name, m in layers.items()]
        try:
            blank = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device)
            with torch.no_grad():
                self(blank)
        finally:
            for hook in hooks:
                hook.remove()
        return sorted(set(layers) - ran)

    def save_adapter(self, directory: str | os.PathLike) -> os.PathLike:
        """The LoRA adapter alone, in peft's format."""
        if self.lora is None:
            raise ValueError(f"The vision tower {self.spec.get('name')!r} has no LoRA adapter to save.")
        return lora.save(self.tower, directory)

    def load_adapter(self, directory: str | os.PathLike) -> None:
        """Load the weights of an adapter saved by `save_adapter` into this bridge's (same settings)."""
        what = f"the vision tower {self.spec.get('name')!r}"
        if self.lora is None:
            raise ValueError(f"{what} has no LoRA adapter: call `add_lora` with its settings first.")
        lora.load(self.tower, directory, settings=self.lora, what=what)

    def merged(self) -> VisionBridge:
        """For exporters: a copy whose tower is the plain tower with the LoRA adapter added into its
        weights (peft's `merge_and_unload`), or this bridge itself when it has no adapter. This
        bridge keeps its adapter."""
        if self.lora is None:
            return self
        return VisionBridge(
            lora.merged_copy(self.tower),
            source=self.source,
            block=self.block,
            width=self.width,
            image_size=self.image_size,
            mean=self.mean,
            std=self.std,
            spec=self.spec,
            compute_dtype=self._compute_dtype,
            num_prefix_tokens=self._num_prefix_tokens,
        )

    # ---- properties -------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.tower.parameters()).device

    @property
    def compute_dtype(self) -> torch.dtype:
        """The explicit one, else the default of the device the tower is on *now*: a bridge built
        on the CPU and later moved to a GPU (as accelerate does) computes in bf16 there."""
        if self._compute_dtype is not None:
            return self._compute_dtype
        return default_compute_dtype(self.device)

    @property
    def num_tokens(self) -> int:
        """n for a (b, 3, image_size, image_size) input, prefix/class tokens included."""
        if self._num_tokens is None:
            # One blank image through the tower: exact for any prefix/register tokens.
            blank = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device)
            with torch.no_grad():
                self._num_tokens = self(blank).shape[1]
        return self._num_tokens

    # ---- forward ----------------------------------------------------------------------------

    def forward(self, pixel_values: Tensor) -> Tensor:
        """pixel_values (b, 3, H, W), normalised as `eval_transform` does -> tokens (b, n, d) in
        `compute_dtype`: the output of block `layer`, prefix/class tokens first, no final norm."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; expected (b, 3, H, W), e.g. "
                f"(b, 3, {self.image_size}, {self.image_size}) as eval_transform() makes them."
            )
        weight = next(self.tower.parameters())
        x = pixel_values.to(device=weight.device, dtype=weight.dtype)
        dtype = self.compute_dtype
        # a trainable tower, or one with a LoRA adapter, keeps the caller's grad mode (the momentum
        # copy runs under no_grad)
        grad = contextlib.nullcontext() if self.trainable or self.lora is not None else torch.no_grad()
        with grad, torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            if self.source == "open_clip":
                tokens = self._open_clip_tokens(x)
            else:
                tokens = self._transformers_tokens(x)
        return tokens.to(dtype)

    def _open_clip_tokens(self, x: Tensor) -> Tensor:
        # Same call for open_clip's ViT and for TimmModel (which forwards to the timm trunk with
        # norm=False): the intermediate is the raw block output, never passed through the norm.
        out = self.tower.forward_intermediates(
            x,
            indices=[self.block],
            stop_early=True,
            intermediates_only=True,
            output_fmt="NLC",
            # timm's EVA fails when asked for prefix tokens it does not have
            output_extra_tokens=self._num_prefix_tokens > 0,
        )
        patches = out["image_intermediates"][0]  # (b, n - prefix, d)
        if "image_intermediates_prefix" not in out:
            return patches
        prefix = out["image_intermediates_prefix"][0]  # (b, prefix, d)
        return torch.cat([prefix, patches], dim=1)  # (b, n, d)

    def _transformers_tokens(self, x: Tensor) -> Tensor:
        # hidden_states[0] is the embeddings output (after CLIP's pre_layrnorm, which belongs to
        # the tower), hidden_states[i + 1] the output of block i; the final post_layernorm /
        # layernorm is applied to last_hidden_state only, never to these.
        hidden_states = self.tower(pixel_values=x, output_hidden_states=True).hidden_states
        return hidden_states[self.block + 1]  # (b, n, d)

    # ---- transforms -------------------------------------------------------------------------

    def train_transform(self) -> transforms.Compose:
        return train_transform(self.image_size, self.mean, self.std)

    def eval_transform(self) -> transforms.Compose:
        return eval_transform(self.image_size, self.mean, self.std)

    def extra_repr(self) -> str:
        return (
            f"source={self.source}, name={self.spec['name']!r}, block={self.block}, width={self.width}, "
            f"image_size={self.image_size}"
        )


def _prune_transformers_blocks(model: nn.Module, num_blocks: int, block: int) -> None:
    """Drop the blocks after `block` from a transformers vision model.

    The blocks are the model's one `nn.ModuleList` of `num_hidden_layers` entries (its path
    differs between models and versions: `encoder.layers`, `encoder.layer`, ...). The encoders
    loop over that list, so hidden_states[block + 1] is unchanged; if the list is not found
    unambiguously the model is left whole, which is only slower.
    """
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_blocks
    ]
    if len(found) != 1:
        return
    name, blocks = found[0]
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, blocks[: block + 1])


# --------------------------------------------------------------------------------------------
# Images and transforms (outside the module: data loaders build them without the weights)
# --------------------------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB. Transparent pixels are composited on white (dropping alpha
    would reveal whatever colour the transparent pixels happen to store, often black); 16-bit
    grayscale is scaled to 8 bits (PIL's own conversion clips it, making most images white)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "P", "RGBa", "La"):
        # P (palette) may carry transparency; without it the composite changes nothing.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode.startswith("I"):  # I;16, I;16B, ... and I (how older PIL opens 16-bit PNGs)
        values = np.asarray(image, dtype=np.float64)
        eight_bit = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)  # 65535 -> 255
        return Image.fromarray(eight_bit).convert("RGB")  # 2-D uint8 -> mode L
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, F (clipped to 0..255), ...


def train_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> transforms.Compose:
    """BLIP-2's training augmentation: random resized crop (scale 0.5-1, bicubic) and flip."""
    return transforms.Compose(
        [
            transforms.Lambda(to_rgb),
            transforms.RandomResizedCrop(
                image_size, scale=(0.5, 1.0), interpolation=InterpolationMode.BICUBIC
            ),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> transforms.Compose:
    """Shorter side to `image_size` (bicubic), then the centre square, as CLIP evaluates.
    LAVIS's BLIP-2 evaluation instead squashes the whole image to a square (Resize((S, S)));
    we keep the aspect ratio, at the cost of the image's borders on elongated images."""
    return transforms.Compose(
        [
            transforms.Lambda(to_rgb),
            transforms.Resize(image_size, interpolation=InterpolationMode.BICUBIC),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and decode an image file (EXIF orientation applied). Raises ValueError naming the file
    when it is missing or not an image, so a bad entry in a dataset says which one it is."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later in a worker
            return ImageOps.exif_transpose(image)  # a copy, detached from the file
    except FileNotFoundError:
        raise ValueError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{path} is not an image file that PIL can read ({error})") from error
