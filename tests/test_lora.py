"""LoRA adapters (peft) on the frozen LLM and vision tower in stage 2: exactly what trains, frozen
weights that stay bit-identical, checkpoints that reload to the same outputs in peft's own format,
the soft-prompt export, the settings' errors, and a `qformer train` run that resumes exactly."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_models import CORPUS, save_llm, save_open_clip_vit

from bridges.language import LanguageBridge
from bridges.vision import VisionBridge
from qformer import QFormerConfig
from qformer.cli import main
from qformer.stage2 import Stage2Model
from recipes import common

CONFIGS = Path(__file__).parent.parent / "recipes" / "configs"
CFG = QFormerConfig.from_name("tiny", vision_width=32, hidden_dropout=0.0, attention_dropout=0.0)
CAPTIONS = ["a cat sits on the mat", "two dogs play in the park", "a red ball"]
GREEDY = dict(num_beams=1, max_new_tokens=6)
R4 = {"r": 4, "alpha": 8}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    return {"opt": save_llm("opt", tmp / "opt"), "t5": save_llm("t5", tmp / "t5"), "vit": save_open_clip_vit(tmp / "vit")}


def build(saved, family: str, **lora) -> Stage2Model:
    name, weights = saved["vit"]
    vision = VisionBridge.from_open_clip(name, weights)
    return Stage2Model(CFG, language=LanguageBridge.from_pretrained(saved[family]), vision=vision, **lora)


def pixels(b: int = 3) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def train_steps(model: Stage2Model, steps: int = 3) -> Stage2Model:
    """A few AdamW steps over the recipe's parameter groups, so the adapters move off their init."""
    model.train()
    optimizer = torch.optim.AdamW(common.param_groups(model, 0.05), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        model(CAPTIONS, pixel_values=pixels())["loss"].backward()
        optimizer.step()
    return model.eval()


def adapter_names(model: Stage2Model) -> set[str]:
    return {n for n in model.trainable_state_dict() if n.startswith(("language.", "vision."))}


# what each case adapts: (LLM, settings) -> the layer names that get A and B
CASES = {
    "opt-llm": ("opt", {"llm_lora": R4}, "language.", {"q_proj", "v_proj"}),
    "t5-llm": ("t5", {"llm_lora": R4}, "language.", {"q", "v"}),
    "vit-vision": ("opt", {"vision_lora": R4}, "vision.", {"c_fc", "c_proj"}),
}


@pytest.mark.parametrize("case", CASES)
def test_exactly_the_query_path_ln_vision_proj_and_the_adapters_train(saved, case):
    family, lora, bridge, layers = CASES[case]
    plain = build(saved, family)
    model = build(saved, family, **lora)
    adapters = adapter_names(model)
    # the Q-Former side trains as without LoRA; inside the bridges only A and B of the chosen layers
    assert set(model.trainable_state_dict(adapters=False)) == set(plain.trainable_state_dict())
    assert set(model.trainable_state_dict()) == set(plain.trainable_state_dict()) | adapters
    assert adapters and all(n.startswith(bridge) for n in adapters)
    assert {n.rsplit(".", 3)[-3] for n in adapters} == {"lora_A", "lora_B"}
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in adapters} == layers
    # the optimizer sees exactly these
    grouped = {id(p) for group in common.param_groups(model, 0.05) for p in group["params"]}
    assert grouped == {id(p) for p in model.trainable_state_dict().values()}


def test_training_moves_the_adapters_and_leaves_every_frozen_weight_bit_identical(saved):
    from peft.tuners.lora import LoraLayer

    model = build(saved, "opt", llm_lora={**R4, "dropout": 0.1}, vision_lora={**R4, "dropout": 0.1})
    trainable = set(model.trainable_state_dict())
    adapters = adapter_names(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    # the frozen models keep their dropout off; only the adapters' own dropout follows train()
    for bridge in (model.language, model.vision):
        adapter_dropouts = {id(d) for m in bridge.modules() if isinstance(m, LoraLayer) for d in m.lora_dropout.values()}
        assert adapter_dropouts and all(d.training for d in bridge.modules() if id(d) in adapter_dropouts)
        assert not any(m.training for m in bridge.modules() if isinstance(m, torch.nn.Dropout) and id(m) not in adapter_dropouts)

    optimizer = torch.optim.AdamW(common.param_groups(model, 0.05), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(CAPTIONS, pixel_values=pixels())["loss"].backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        optimizer.step()
    assert with_grad == trainable  # after step 1 (B != 0) every adapter matrix gets a gradient

    after = model.state_dict()
    frozen = [k for k in after if k.startswith(("language.", "vision.")) and k not in adapters]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)
    assert all(not torch.equal(after[k], before[k]) for k in adapters)


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_save_and_from_pretrained_give_the_same_loss_and_greedy_tokens(saved, family, tmp_path):
    lora = {"llm_lora": R4, "vision_lora": {"r": 2}} if family == "opt" else {"llm_lora": R4}
    model = train_steps(build(saved, family, **lora))
    model.save_pretrained(tmp_path / "s2")

    # the Q-Former side in model.safetensors, each adapter in its folder in peft's format
    weights = load_file(str(tmp_path / "s2" / "model.safetensors"))
    assert set(weights) == set(model.trainable_state_dict(adapters=False))
    config = json.loads((tmp_path / "s2" / "config.json").read_text())
    targets = ["q_proj", "v_proj"] if family == "opt" else ["q", "v"]
    assert config["llm_lora"] == {"r": 4, "alpha": 8.0, "dropout": 0.05, "target_modules": targets}
    assert (tmp_path / "s2" / "llm_adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "s2" / "llm_adapter" / "adapter_config.json").is_file()
    if family == "opt":
        assert config["vision_lora"]["target_modules"] == ["mlp.c_fc", "mlp.c_proj"]
        assert (tmp_path / "s2" / "vision_adapter" / "adapter_model.safetensors").is_file()
    else:
        assert config["vision_lora"] is None and not (tmp_path / "s2" / "vision_adapter").exists()

    again = Stage2Model.from_pretrained(tmp_path / "s2").eval()
    with torch.no_grad():
        loss = model(CAPTIONS, pixel_values=pixels())["loss"]
        assert torch.equal(again(CAPTIONS, pixel_values=pixels())["loss"], loss)
        with model.language.model.disable_adapter():  # the adapter matters to the loss
            assert not torch.equal(model(CAPTIONS, pixel_values=pixels())["loss"], loss)
    assert again.generate(pixel_values=pixels(), **GREEDY) == model.generate(pixel_values=pixels(), **GREEDY)


def test_the_adapter_is_pefts_own_format_and_merges_into_a_plain_model(saved, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, OPTForCausalLM

    model = train_steps(build(saved, "opt", llm_lora=R4, vision_lora=R4))
    model.save_pretrained(tmp_path / "s2")
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    ours = model.language.model(input_ids=ids).logits
    # peft loads our folder onto the plain LLM and computes what the bridge computes
    llm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved["opt"]), tmp_path / "s2" / "llm_adapter")
    assert torch.equal(llm.eval()(input_ids=ids).logits, ours)

    # exporters' copy: plain models in both bridges with the adapters merged in; the original keeps its
    plain = model.merged()
    assert type(plain.language.model) is OPTForCausalLM and type(plain.vision.tower).__name__ == "VisionTransformer"
    assert plain.language.lora is None and plain.vision.lora is None and model.language.lora is not None
    assert set(plain.trainable_state_dict()) == set(model.trainable_state_dict(adapters=False))
    assert not any(p.requires_grad for p in plain.language.parameters()) and not plain.language.model.training
    torch.testing.assert_close(plain.language.model(input_ids=ids).logits, ours, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(plain(CAPTIONS, pixel_values=pixels())["loss"],
                                   model(CAPTIONS, pixel_values=pixels())["loss"], rtol=1e-4, atol=1e-4)  # fmt: skip
    assert plain.generate(pixel_values=pixels(), **GREEDY) == model.generate(pixel_values=pixels(), **GREEDY)


def test_soft_prompt_export_carries_the_adapters_and_says_the_llm_needs_its_own(saved, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qformer import SoftVisualPrompt
    from qformer.export import export_soft_prompt

    model = train_steps(build(saved, "opt", llm_lora=R4, vision_lora=R4))
    model.save_pretrained(tmp_path / "s2")
    with pytest.warns(UserWarning, match="llm_adapter"):
        export_soft_prompt(tmp_path / "s2", tmp_path / "sp")
    manifest = json.loads((tmp_path / "sp" / "soft_prompt.json").read_text())
    assert manifest["llm_adapter"] == "llm_adapter" and "PeftModel.from_pretrained" in manifest["note"]
    assert (tmp_path / "sp" / "llm_adapter" / "adapter_model.safetensors").is_file()

    svp = SoftVisualPrompt.from_pretrained(tmp_path / "sp")
    assert svp.llm_adapter == tmp_path / "sp" / "llm_adapter"
    soft, mask = svp(pixels())
    with torch.no_grad():  # the artifact applies the tower's adapter itself
        torch.testing.assert_close(soft, model.soft_prompt(pixel_values=pixels()))

    # the LLM loaded with its adapter through peft continues the soft prompt as `generate` does
    llm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(svp.manifest["llm"]), svp.llm_adapter).eval()
    tok = AutoTokenizer.from_pretrained(svp.manifest["llm"])
    eos = svp.manifest["eos_token_id"]
    got = []
    for i in range(3):
        ids = tok("", return_tensors="pt").input_ids  # BOS
        embeds = torch.cat([soft[i : i + 1], llm.get_input_embeddings()(ids)], dim=1)
        out = llm.generate(inputs_embeds=embeds, attention_mask=torch.cat([mask[i : i + 1], torch.ones_like(ids)], 1),
                           do_sample=False, min_new_tokens=1, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                           **GREEDY)  # fmt: skip
        row = out[0].tolist()
        got.append(tok.decode(row[: row.index(eos)] if eos in row else row, skip_special_tokens=True).strip())
    assert got == model.generate(pixel_values=pixels(), **GREEDY)


def test_an_unmodified_llm_export_names_no_adapter(saved, tmp_path):
    from qformer import SoftVisualPrompt
    from qformer.export import export_soft_prompt

    build(saved, "opt").save_pretrained(tmp_path / "s2")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        export_soft_prompt(tmp_path / "s2", tmp_path / "sp")
    assert SoftVisualPrompt.from_pretrained(tmp_path / "sp").llm_adapter is None
    assert not (tmp_path / "sp" / "llm_adapter").exists()


# ------------------------------------------------------------------------------ errors
def test_vision_lora_with_a_feature_cache_is_a_config_error_that_says_how_to_fix_it(saved, tmp_path, capsys):
    args = ["train", str(CONFIGS / "tiny_stage2.yaml"), f"output_dir={tmp_path}", "feature_cache=cache/",
            "vision_lora.r=4"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "`vision_lora` adapts the vision tower" in err and "computed without the adapter" in err
    assert "unset `feature_cache`" in err and "or unset `vision_lora`" in err
    # the model itself refuses cached tokens once its tower has an adapter
    model = build(saved, "opt", vision_lora=R4)
    with pytest.raises(ValueError, match="LoRA adapter.*pass `pixel_values`"):
        model.soft_prompt(image_tokens=torch.zeros(1, 17, 32))


def test_bad_lora_settings_are_all_named_at_once(tmp_path, capsys):
    args = ["train", str(CONFIGS / "tiny_stage2.yaml"), f"output_dir={tmp_path}", "llm_lora.r=0",
            "llm_lora.rank=4", "llm_lora.dropout=1.5"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "`llm_lora.r` must be a positive int" in err and "unknown key `llm_lora.rank`" in err
    assert "`llm_lora.dropout` must be in [0, 1)" in err


def test_targets_that_cannot_work_name_the_setting_and_the_layers_that_can(saved):
    name, weights = saved["vit"]
    with pytest.raises(ValueError, match=r"`llm_lora.target_modules` = \['nope'\] matches no layer.*q_proj"):
        build(saved, "opt", llm_lora={"target_modules": ["nope"]})
    # open_clip's attention is an nn.MultiheadAttention, which peft adapts by editing the frozen weights
    tower = VisionBridge.from_open_clip(name, weights)
    with pytest.raises(ValueError, match="vision_lora.target_modules` matches nn.MultiheadAttention.*mlp.c_fc"):
        tower.add_lora({"target_modules": ["attn"]}, key="vision_lora")
    assert tower.lora is None and type(tower.tower).__name__ == "VisionTransformer"  # left untouched


class UsesAWeightDirectly(torch.nn.Module):
    """A toy tower whose `skipped` layer never runs its forward: its weight goes to F.linear, as
    some attention blocks do with theirs."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped = torch.nn.Linear(8, 8)
        self.called = torch.nn.Linear(8, 8)

    def forward_intermediates(self, x: torch.Tensor, **_) -> dict[str, list[torch.Tensor]]:
        tokens = x.reshape(x.shape[0], -1, 8)  # (b, 24, 8) for 8 x 8 pixels
        hidden = torch.nn.functional.linear(tokens, self.skipped.weight, self.skipped.bias)
        return {"image_intermediates": [self.called(hidden)]}


def test_an_adapter_the_forward_would_bypass_is_refused():
    tower = VisionBridge(UsesAWeightDirectly(), source="open_clip", block=0, width=8, image_size=8, mean=(0, 0, 0),
                         std=(1, 1, 1), spec={"name": "toy"}, num_prefix_tokens=0)  # fmt: skip
    with pytest.raises(ValueError, match=r"vision_lora.target_modules` picks layers.*never runs \(skipped\)"):
        tower.add_lora({"target_modules": ["skipped", "called"]}, key="vision_lora")
    assert tower.lora is None and type(tower.tower) is UsesAWeightDirectly  # left as it was
    tower.add_lora({"target_modules": ["called"]}, key="vision_lora")  # this one runs
    assert tower.lora.target_modules == ("called",)


# ------------------------------------------------------------------------------ the recipe
@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Eight flat-coloured images with captions, in the recipes' annotation format."""
    folder = tmp_path_factory.mktemp("images")
    records = []
    for i in range(8):
        Image.new("RGB", (32, 32), (30 * i, 255 - 30 * i, 90)).save(folder / f"{i}.png")
        records.append({"image": f"{i}.png", "caption": CORPUS[i % 7]})
    (folder / "train.json").write_text(json.dumps(records))
    return folder


def test_qformer_train_with_lora_runs_resumes_exactly_and_captions(saved, images, tmp_path, capsys):
    name, weights = saved["vit"]

    def args(out: Path, *extra: str) -> list[str]:
        # a fresh tiny Q-Former (no stage 1), the tiny ViT and OPT, both adapted
        return [
            "train", str(CONFIGS / "tiny_stage2.yaml"), f"output_dir={out}", f"train_data={images / 'train.json'}",
            "stage1=null", "qformer_preset=tiny", "qformer.hidden_dropout=0.0", "vision.source=open_clip",
            f"vision.name={name}", f"vision.pretrained={weights}", f"llm={saved['opt']}", "llm_lora.r=4",
            "vision_lora.r=2", "batch_size=4", "max_steps=3", "save_every=2", "log_every=1", "warmup_steps=1", *extra,
        ]  # fmt: skip

    assert main(args(tmp_path / "a")) == 0
    config = json.loads((tmp_path / "a" / "model" / "config.json").read_text())
    assert config["llm_lora"]["r"] == 4 and config["llm_lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert config["vision_lora"]["r"] == 2
    # the checkpoint holds the adapter's optimizer moments beside the Q-Former's
    step2 = tmp_path / "a" / "checkpoints" / "step-0000002"
    moments = load_file(str(step2 / "optimizer.safetensors"))
    for bridge in ("language.", "vision."):
        assert any(k.startswith(bridge) and ".lora_B." in k and k.endswith("::exp_avg") for k in moments)
    assert any(k.startswith("proj.") for k in moments)

    assert main(args(tmp_path / "b", f"resume_from={step2}")) == 0
    for part in ("model.safetensors", "llm_adapter/adapter_model.safetensors", "vision_adapter/adapter_model.safetensors"):
        a = load_file(str(tmp_path / "a" / "model" / part))
        b = load_file(str(tmp_path / "b" / "model" / part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part

    # `qformer caption` loads the adapter with the checkpoint, and says what `generate` says
    capsys.readouterr()
    assert main(["caption", "--checkpoint", str(tmp_path / "a" / "model"), "--num-beams", "1",
                 "--max-new-tokens", "5", str(images / "0.png")]) == 0  # fmt: skip
    line = capsys.readouterr().out.rstrip("\n")
    model = Stage2Model.from_pretrained(tmp_path / "a" / "model").eval()
    assert model.language.lora is not None and model.vision.lora is not None
    from qformer.evaluate import image_pixels

    expected = model.generate(pixel_values=image_pixels(model.vision, [images / "0.png"]), num_beams=1, max_new_tokens=5)
    assert line == f"{images / '0.png'}\t{expected[0]}"
