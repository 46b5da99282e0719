"""The vision bridge on tiny towers that the tests build, save and load back through the normal
loading paths (a weights file for open_clip, a folder for transformers): open_clip's own ViT, a
timm EVA inside open_clip (the family of BLIP-2's EVA ViT-g), and a transformers CLIPVisionModel.

The reference for "the output of block `layer`" is a forward hook on that block in an unpruned
copy of the same model, run through the library's own forward.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from bridges.dtypes import default_compute_dtype
from bridges.vision import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    VisionBridge,
    eval_transform,
    load_image,
    to_rgb,
    train_transform,
)

IMAGE_SIZE, PATCH, WIDTH, BLOCKS = 32, 8, 32, 3
NUM_TOKENS = 1 + (IMAGE_SIZE // PATCH) ** 2  # class token + 16 patches
PROCESSOR_MEAN, PROCESSOR_STD = (0.1, 0.2, 0.3), (0.3, 0.2, 0.1)
TINY_TEXT = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}


def _perturb(model: nn.Module, seed: int) -> None:
    """Make the saved weights differ from any fresh random init (the suite reseeds every test, so
    a fresh model could otherwise equal the saved one and hide a load that did nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@dataclass
class Backend:
    """A saved tiny tower: how to load it as a bridge, and as an unpruned reference."""

    build: Callable[..., VisionBridge]  # (layer=..., compute_dtype=...) -> bridge
    # an unpruned copy: (its forward on pixels, its blocks)
    reference: Callable[[], tuple[Callable[[torch.Tensor], object], nn.ModuleList]]
    blocks_of: Callable[[VisionBridge], nn.ModuleList]  # the bridge's (pruned) blocks
    saved_visual: Callable[[], dict[str, torch.Tensor]]  # saved tower weights, bridge key names
    fresh: Callable[[], nn.Module]  # the same tower, randomly initialised


def _open_clip_backend(tmp: Path, name: str, vision_cfg: dict, blocks_attr: Callable) -> Backend:
    config = {"embed_dim": 16, "vision_cfg": vision_cfg, "text_cfg": TINY_TEXT}
    if "timm_model_name" in vision_cfg:
        config["custom_text"] = True  # as open_clip's EVA configs
    config_file = tmp / f"{name}.json"
    config_file.write_text(json.dumps(config))
    open_clip.add_model_config(config_file)  # registered under the file's stem
    model = open_clip.create_model(name)
    _perturb(model, seed=len(name))
    weights = tmp / f"{name}.safetensors"
    save_file(model.state_dict(), str(weights))

    def saved_visual():
        return {k[len("visual.") :]: v for k, v in load_file(str(weights)).items() if k.startswith("visual.")}

    def reference():
        visual = open_clip.create_model(name, pretrained=str(weights)).visual.eval()
        return visual, blocks_attr(visual)  # visual(x): open_clip's whole forward, to the embedding

    return Backend(
        build=lambda **kw: VisionBridge.from_open_clip(name, str(weights), **kw),
        reference=reference,
        blocks_of=lambda bridge: blocks_attr(bridge.tower),
        saved_visual=saved_visual,
        fresh=lambda: open_clip.create_model(name).visual,
    )


@pytest.fixture(scope="module")
def backends(tmp_path_factory) -> dict[str, Backend]:
    tmp = tmp_path_factory.mktemp("vision_bridge")

    # 1. open_clip's own ViT. patch_dropout is on so that a tower left in train mode would show
    # (it drops tokens); heads = width / head_width = 4.
    vit_cfg = {"image_size": IMAGE_SIZE, "patch_size": PATCH, "width": WIDTH, "layers": BLOCKS,
               "head_width": WIDTH // 4, "mlp_ratio": 2, "patch_dropout": 0.5}
    vit = _open_clip_backend(tmp, "qformer-test-tiny-vit", vit_cfg, lambda v: v.transformer.resblocks)

    # 2. A timm EVA inside open_clip: the architecture of BLIP-2's tower (timm's
    # eva_giant_patch14_224), shrunk through timm's own `local-dir:` model config, as open_clip's
    # EVA01-g-14 config uses it (token pool, no extra projection). Drop-path and dropout are on.
    timm_dir = tmp / "timm_tiny_eva"
    timm_dir.mkdir()
    (timm_dir / "config.json").write_text(json.dumps({
        "architecture": "eva_giant_patch14_224",
        "model_args": {"img_size": IMAGE_SIZE, "patch_size": PATCH, "embed_dim": WIDTH,
                       "depth": BLOCKS, "num_heads": 4, "mlp_ratio": 2.0,
                       "drop_path_rate": 0.5, "proj_drop_rate": 0.5},
        "pretrained_cfg": {"input_size": [3, IMAGE_SIZE, IMAGE_SIZE]},
    }))
    eva_cfg = {"image_size": IMAGE_SIZE, "timm_model_name": f"local-dir:{timm_dir}",
               "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": None}
    eva = _open_clip_backend(tmp, "qformer-test-tiny-eva", eva_cfg, lambda v: v.trunk.blocks)

    # 3. A transformers CLIPVisionModel saved with its image processor.
    clip_dir = tmp / "hf_clip_vision"
    clip_config = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=WIDTH,
                                   intermediate_size=2 * WIDTH, num_hidden_layers=BLOCKS,
                                   num_attention_heads=4, attention_dropout=0.5)
    clip = CLIPVisionModel(clip_config)
    _perturb(clip, seed=3)
    clip.save_pretrained(clip_dir)
    processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(PROCESSOR_MEAN), image_std=list(PROCESSOR_STD),
    )
    processor.save_pretrained(clip_dir)

    def hf_reference():
        model = CLIPVisionModel.from_pretrained(clip_dir).eval()
        return (lambda x: model(pixel_values=x)), model.encoder.layers

    hf = Backend(
        build=lambda **kw: VisionBridge.from_transformers(str(clip_dir), **kw),
        reference=hf_reference,
        blocks_of=lambda bridge: bridge.tower.encoder.layers,
        saved_visual=lambda: load_file(str(clip_dir / "model.safetensors")),
        fresh=lambda: CLIPVisionModel(clip_config),
    )
    return {"open_clip_vit": vit, "open_clip_timm_eva": eva, "transformers_clip": hf}


BACKENDS = ["open_clip_vit", "open_clip_timm_eva", "transformers_clip"]


def pixels(b: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(7))


# ---- the tokens -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer", [-2, 0])
def test_tokens_are_the_chosen_blocks_output(backends, backend, layer):
    be = backends[backend]
    bridge = be.build(layer=layer, compute_dtype=torch.float32)
    x = pixels()
    tokens = bridge(x)
    assert tokens.shape == (2, NUM_TOKENS, WIDTH)  # class token included
    assert (bridge.width, bridge.num_tokens, bridge.image_size) == (WIDTH, NUM_TOKENS, IMAGE_SIZE)

    # Blocks after the chosen one are gone.
    assert len(be.blocks_of(bridge)) == layer % BLOCKS + 1

    # Reference: a hook on that block of the whole, unpruned model running its own forward.
    run, blocks = be.reference()
    assert len(blocks) == BLOCKS
    seen = []
    blocks[layer].register_forward_hook(
        lambda module, args, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        run(x)
    assert len(seen) == 1
    torch.testing.assert_close(tokens, seen[0], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_weights_are_loaded(backends, backend):
    be = backends[backend]
    loaded = be.build().tower.state_dict()
    saved = be.saved_visual()
    assert loaded
    for key, value in loaded.items():
        assert torch.equal(value, saved[key]), key
    # ... and they are not simply what a fresh random init gives
    fresh = be.fresh().state_dict()
    assert not all(torch.equal(v, fresh[k]) for k, v in loaded.items())


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_for_real(backends, backend):
    bridge = backends[backend].build(compute_dtype=torch.float32)
    assert not any(p.requires_grad for p in bridge.parameters())

    class Parent(nn.Module):  # what stage 2 does: a frozen bridge under a trainable part
        def __init__(self):
            super().__init__()
            self.vision = bridge
            self.head = nn.Linear(WIDTH, 4)

        def forward(self, x):
            return self.head(self.vision(x))

    parent = Parent()
    parent.train()
    assert parent.training and parent.head.training
    assert not any(m.training for m in bridge.modules()), "train() reached the frozen tower"
    x = pixels()
    # dropout / drop-path / patch dropout are configured on, so train mode would differ (or change n)
    torch.testing.assert_close(bridge(x), bridge(x), rtol=0, atol=0)

    parent(x).square().mean().backward()
    assert all(p.grad is None for p in bridge.parameters())
    assert parent.head.weight.grad is not None


def test_layer_out_of_range_says_the_range(backends):
    with pytest.raises(ValueError, match=r"layer=3 is out of range .* 3 blocks: use -3\.\.2"):
        backends["open_clip_vit"].build(layer=3)
    with pytest.raises(ValueError, match=r"layer=-4 is out of range"):
        backends["transformers_clip"].build(layer=-4)


def test_wrong_pixel_shape_names_the_shape(backends):
    bridge = backends["open_clip_vit"].build()
    with pytest.raises(ValueError, match=r"\(3, 32, 32\); expected \(b, 3, H, W\)"):
        bridge(torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE))
    with pytest.raises(ValueError, match=r"\(2, 1, 32, 32\); expected \(b, 3, H, W\)"):
        bridge(torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE))


# ---- compute dtype --------------------------------------------------------------------------


def test_default_dtype_on_this_cpu(backends):
    """Whatever this CPU's default is, the bridge uses it, and bf16 (if chosen) stays close."""
    be = backends["open_clip_timm_eva"]
    bridge = be.build()
    assert bridge.compute_dtype == default_compute_dtype("cpu")
    x = pixels()
    tokens = bridge(x)
    assert tokens.dtype == bridge.compute_dtype
    exact = be.build(compute_dtype=torch.float32)(x)
    tol = 0 if bridge.compute_dtype == torch.float32 else 0.1
    torch.testing.assert_close(tokens.float(), exact, rtol=tol, atol=tol)


# ---- spec and loading details ----------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_spec_round_trips(backends, backend):
    bridge = backends[backend].build(layer=0, compute_dtype=torch.float32)
    spec = json.loads(json.dumps(bridge.spec))  # JSON-able, as a checkpoint config stores it
    assert spec["layer"] == 0 and spec["source"] in ("open_clip", "transformers")
    again = VisionBridge.from_spec(spec, compute_dtype=torch.float32)
    assert again.spec == bridge.spec
    x = pixels()
    torch.testing.assert_close(again(x), bridge(x), rtol=0, atol=0)


def test_bad_spec_lists_every_problem():
    with pytest.raises(ValueError, match=r"(?s)source='timm'.*name=None.*layer='-2'"):
        VisionBridge.from_spec({"source": "timm", "layer": "-2"})


def test_transformers_normalisation_comes_from_the_processor(backends, tmp_path):
    bridge = backends["transformers_clip"].build()
    assert (bridge.mean, bridge.std, bridge.image_size) == (PROCESSOR_MEAN, PROCESSOR_STD, IMAGE_SIZE)
    # saved without a processor: the config's image size and CLIP's usual mean/std
    config = CLIPVisionConfig(image_size=24, patch_size=8, hidden_size=16, intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=2)
    CLIPVisionModel(config).save_pretrained(tmp_path)
    bare = VisionBridge.from_transformers(str(tmp_path))
    assert (bare.mean, bare.std) == (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    assert (bare.image_size, bare.num_tokens) == (24, 1 + 3 * 3)


def test_two_tower_transformers_checkpoint_loads_the_vision_tower(tmp_path):
    vision = {"image_size": IMAGE_SIZE, "patch_size": PATCH, "hidden_size": WIDTH, "intermediate_size": 64,
              "num_hidden_layers": BLOCKS, "num_attention_heads": 4}
    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 64, "bos_token_id": 0, "eos_token_id": 1}
    clip = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=8)).eval()
    clip.save_pretrained(tmp_path)
    bridge = VisionBridge.from_transformers(str(tmp_path), compute_dtype=torch.float32)
    assert isinstance(bridge.tower, CLIPVisionModel)
    x = pixels()
    with torch.no_grad():
        expected = clip.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[BLOCKS - 1]
    torch.testing.assert_close(bridge(x), expected, rtol=0, atol=0)


# ---- images and transforms --------------------------------------------------------------------

MEAN, STD, S = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5), 16


def normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    """By hand: ToTensor divides by 255, Normalize subtracts the mean and divides by the std."""
    return torch.tensor([(v / 255 - m) / s for v, m, s in zip(rgb, MEAN, STD)])


def odd_images() -> dict[str, tuple[Image.Image, tuple[int, int, int]]]:
    """Uniform 50x17 images of several modes, with the RGB colour each must become."""
    i16 = Image.fromarray(np.full((17, 50), 128 * 257, dtype=np.uint16))  # mode I;16
    palette = Image.new("P", (50, 17), 0)
    palette.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    return {
        "L": (Image.new("L", (50, 17), 128), (128, 128, 128)),
        "RGBA transparent": (Image.new("RGBA", (50, 17), (255, 0, 0, 0)), (255, 255, 255)),
        "RGBA opaque": (Image.new("RGBA", (50, 17), (0, 0, 255, 255)), (0, 0, 255)),
        "LA half": (Image.new("LA", (50, 17), (0, 128)), (127, 127, 127)),
        "P": (palette, (10, 20, 30)),
        "CMYK white": (Image.new("CMYK", (50, 17), (0, 0, 0, 0)), (255, 255, 255)),
        "I;16": (i16, (128, 128, 128)),
        "RGB": (Image.new("RGB", (50, 17), (1, 2, 3)), (1, 2, 3)),
    }


@pytest.mark.parametrize("mode", list(odd_images()))
def test_to_rgb(mode):
    image, rgb = odd_images()[mode]
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == (50, 17)
    assert np.abs(np.asarray(out).astype(int) - np.array(rgb)).max() <= 1, np.asarray(out)[0, 0]


@pytest.mark.parametrize("make", [eval_transform, train_transform])
@pytest.mark.parametrize("mode", ["L", "RGBA transparent", "I;16", "CMYK white", "RGB"])
def test_transforms_make_normalised_square_rgb(make, mode):
    image, rgb = odd_images()[mode]
    tensor = make(S, MEAN, STD)(image)
    assert tensor.shape == (3, S, S) and tensor.dtype == torch.float32
    # a uniform image stays uniform through crop, flip and bicubic resize
    expected = normalised(rgb)[:, None, None].expand(3, S, S)
    torch.testing.assert_close(tensor, expected, rtol=0, atol=1.5 / 255 / min(STD))
    assert torch.allclose(tensor[:, 5, 7], normalised(rgb), atol=1.5 / 255 / min(STD))


def test_bridge_transforms_use_its_settings(backends):
    bridge = backends["transformers_clip"].build()
    tensor = bridge.eval_transform()(Image.new("RGB", (50, 17), (255, 255, 255)))
    assert tensor.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    expected = torch.tensor([(1 - m) / s for m, s in zip(PROCESSOR_MEAN, PROCESSOR_STD)])
    torch.testing.assert_close(tensor[:, 0, 0], expected)
    assert bridge.train_transform()(Image.new("L", (9, 40))).shape == (3, IMAGE_SIZE, IMAGE_SIZE)


def test_load_image(tmp_path):
    path = tmp_path / "logo.png"
    Image.new("RGBA", (7, 5), (0, 0, 0, 0)).save(path)
    image = load_image(path)
    assert image.size == (7, 5) and image.mode == "RGBA"
    assert to_rgb(image).getpixel((0, 0)) == (255, 255, 255)

    text = tmp_path / "captions.txt"
    text.write_text("a dog on a beach\n")
    with pytest.raises(ValueError, match="captions.txt is not an image"):
        load_image(text)
    with pytest.raises(ValueError, match="not found: .*missing.jpg"):
        load_image(tmp_path / "missing.jpg")


def test_an_open_clip_config_file_is_registered_and_kept_in_the_spec(tmp_path):
    import open_clip
    from tiny_models import save_open_clip_vit

    name, weights = save_open_clip_vit(tmp_path, name="qformer-test-config-file-vit")
    open_clip.factory._MODEL_CONFIGS.pop(name)  # as in a fresh process: nothing registered
    bridge = VisionBridge.from_open_clip(str(tmp_path / f"{name}.json"), weights)
    assert bridge.spec["name"] == str(tmp_path / f"{name}.json")
    open_clip.factory._MODEL_CONFIGS.pop(name)
    again = VisionBridge.from_spec(bridge.spec)
    x = pixels()
    torch.testing.assert_close(again(x), bridge(x))
