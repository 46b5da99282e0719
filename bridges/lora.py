"""LoRA adapters on the frozen towers, through peft.

BLIP-2 keeps the vision tower and the LLM frozen. Stage 2 may instead adapt one or both of them
with LoRA: chosen Linear layers compute W x + (alpha / r) B A x, where W stays frozen (and
bit-identical), A (r, d_in) and B (d_out, r) train, and B starts at zero, so training starts from
the unmodified model. A bridge holds its adapted model as a peft `PeftModel` and saves the adapter
in peft's own format (`adapter_config.json` + `adapter_model.safetensors`), so that peft loads it
onto the plain model:

    llm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(NAME), "CKPT/llm_adapter")

This module holds what both bridges share: the settings, wrapping, saving, strict loading,
merging, and the adapter's dropout (on in training, while the frozen model keeps its own off).
peft is imported only when an adapter is made, so settings parse without it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from peft import PeftModel

ADAPTER_CONFIG = "adapter_config.json"  # peft's file names
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEYS = ("r", "alpha", "dropout", "target_modules")


@dataclass(frozen=True)
class LoraSettings:
    """One adapter, as the `llm_lora` / `vision_lora` settings spell it."""

    r: int = 8  # rank of the update B A
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.05  # on the adapter's input, in training only
    # Layers to adapt: names matched as suffixes of module paths ("q_proj" matches every
    # "...self_attn.q_proj"), or one string read as a regex on the whole path. None: the bridge's
    # choice for the model (`LanguageBridge.add_lora`, `VisionBridge.add_lora`).
    target_modules: tuple[str, ...] | str | None = None

    @classmethod
    def from_value(cls, value: LoraSettings | dict[str, Any], *, key: str = "lora") -> LoraSettings:
        """Settings from a mapping (YAML, a checkpoint's config); every problem in one error."""
        if isinstance(value, LoraSettings):
            return value
        problems = lora_problems(value, key=key)
        if problems:
            raise ValueError(f"Invalid `{key}`:\n  - " + "\n  - ".join(problems))
        targets = value.get("target_modules")
        return cls(
            r=value.get("r", cls.r),
            alpha=float(value.get("alpha", cls.alpha)),
            dropout=float(value.get("dropout", cls.dropout)),
            target_modules=tuple(targets) if isinstance(targets, (list, tuple)) else targets,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, as a checkpoint's config records it."""
        d = asdict(self)
        if isinstance(self.target_modules, tuple):
            d["target_modules"] = list(self.target_modules)
        return d

    def with_targets(self, targets: Sequence[str] | str) -> LoraSettings:
        return LoraSettings(self.r, self.alpha, self.dropout, targets if isinstance(targets, str) else tuple(targets))


def lora_problems(value: Any, *, key: str) -> list[str]:
    """What is wrong with a `{r, alpha, dropout, target_modules}` mapping (empty: nothing)."""
    if not isinstance(value, dict):
        return [f"`{key}` must be a mapping with {', '.join(KEYS)} (or null for no adapter), got {value!r}"]
    p = [f"unknown key `{key}.{k}`; valid keys: {', '.join(KEYS)}" for k in value if k not in KEYS]
    r = value.get("r", LoraSettings.r)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        p.append(f"`{key}.r` must be a positive int (the adapter's rank, e.g. 8), got {r!r}")
    alpha = value.get("alpha", LoraSettings.alpha)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        p.append(f"`{key}.alpha` must be a positive number (e.g. 2 * r), got {alpha!r}")
    dropout = value.get("dropout", LoraSettings.dropout)
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        p.append(f"`{key}.dropout` must be in [0, 1), got {dropout!r}")
    targets = value.get("target_modules")
    ok = (
        targets is None
        or (isinstance(targets, str) and targets != "")
        or (isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) and t for t in targets))
    )
    if not ok:
        p.append(
            f"`{key}.target_modules` must be null (the default per model), a list of layer names "
            f"(e.g. [q_proj, v_proj]) or one regex, got {targets!r}"
        )
    return p


# --------------------------------------------------------------------------------------------
# making, saving and loading an adapter
# --------------------------------------------------------------------------------------------


def linear_names(model: nn.Module, limit: int = 8) -> str:
    """A few distinct names of Linear layers that LoRA can adapt (the last two path parts), for
    error messages. An nn.MultiheadAttention's out_proj is left out (see `wrap`)."""
    inside_attention = {
        f"{path}.out_proj" for path, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)
    }
    names: list[str] = []
    for path, module in model.named_modules():
        if path in inside_attention:
            continue
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            short = ".".join(p for p in path.split(".")[-2:] if not p.isdigit())
            if short not in names:
                names.append(short)
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def _show(targets: tuple[str, ...] | str | None) -> str:
    return repr(list(targets)) if isinstance(targets, tuple) else repr(targets)


def has_module(model: nn.Module, name: str) -> bool:
    """Whether some Linear layer's path ends with `name` (as peft matches a list entry)."""
    return any(
        (path == name or path.endswith("." + name)) and isinstance(module, nn.Linear)
        for path, module in model.named_modules()
    )


def wrap(
    model: nn.Module, settings: LoraSettings, *, task_type: str | None, key: str, what: str
) -> PeftModel:
    """`model` with a fresh LoRA adapter (peft's "default"), the adapter's dropout off. Fails
    before touching `model` when the targets match nothing or an `nn.MultiheadAttention`."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import check_target_module_exists

    assert settings.target_modules is not None, "resolve the targets first"
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules) if isinstance(settings.target_modules, tuple) else settings.target_modules,
        task_type=task_type,
    )
    matched = {path: m for path, m in model.named_modules() if path and check_target_module_exists(config, path)}
    if not matched:
        raise ValueError(
            f"`{key}.target_modules` = {_show(settings.target_modules)} matches no layer of {what}; its Linear "
            f"layers include: {linear_names(model)}. Name some of them (suffixes of module paths)."
        )
    parents = {path: model.get_submodule(path.rpartition(".")[0]) if "." in path else model for path in matched}
    attention = sorted(
        path for path, m in matched.items()
        if isinstance(m, nn.MultiheadAttention) or isinstance(parents[path], nn.MultiheadAttention)
    )  # fmt: skip
    if attention:
        # peft adapts an nn.MultiheadAttention by adding B A to its frozen weights before every
        # forward and subtracting it after: the frozen weights drift by rounding. Its out_proj's
        # own forward never runs, so an adapter there would be ignored.
        raise ValueError(
            f"`{key}.target_modules` matches nn.MultiheadAttention layers of {what} ({', '.join(attention[:3])}"
            f"{', ...' if len(attention) > 3 else ''}), which LoRA cannot adapt while keeping the frozen "
            f"weights exact. Target Linear layers instead, e.g. {linear_names(model, 4)}."
        )
    # GPT-2's Conv1D stores its weight transposed; peft needs to be told (else it warns and guesses)
    config.fan_in_fan_out = any(type(m).__name__ == "Conv1D" for m in matched.values())
    peft_model = get_peft_model(model, config)
    set_dropout(peft_model, False)
    return peft_model


def set_dropout(model: nn.Module, training: bool) -> None:
    """Switch the adapters' dropout alone: the frozen model around them stays in eval mode."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.lora_dropout.train(training)


def save(model: PeftModel, directory: str | Path) -> Path:
    """The adapter alone, in peft's format (`PeftModel.from_pretrained(base, directory)` loads it)."""
    directory = Path(directory)
    model.save_pretrained(str(directory))
    return directory


def load(model: PeftModel, directory: str | Path, *, settings: LoraSettings, what: str) -> None:
    """Copy the adapter saved in `directory` into `model`'s, strictly: its settings must be
    `settings` and its tensors exactly the model's adapter tensors, by name and shape."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"{directory / name} not found: the LoRA adapter of {what} is saved there in peft's format "
                f"({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}) by `Stage2Model.save_pretrained`."
            )
    saved = json.loads((directory / ADAPTER_CONFIG).read_text())
    ours = settings.to_dict()
    theirs = {
        "r": saved.get("r"),
        "alpha": float(saved.get("lora_alpha", 0)),
        "target_modules": saved.get("target_modules"),
    }
    diffs = []
    for field, value in theirs.items():
        mine = ours[field]
        if field == "target_modules" and isinstance(value, list) and isinstance(mine, list):
            value, mine = sorted(value), sorted(mine)
        if value != mine:
            diffs.append(f"{field}: saved {value!r} vs expected {mine!r}")
    if diffs:
        raise ValueError(
            f"The LoRA adapter in {directory} is not the one the checkpoint's config describes for {what}:\n  - "
            + "\n  - ".join(diffs)
        )
    state = load_file(str(directory / ADAPTER_WEIGHTS))
    own = get_peft_model_state_dict(model)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"Cannot load the LoRA adapter in {directory} into {what}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, wrong shape {wrong[:5]}. It was made for another model or other settings."
        )
    set_peft_model_state_dict(model, state)


def merged_copy(model: PeftModel) -> nn.Module:
    """A copy of the plain model with the adapter added into its weights (W + alpha / r B A);
    `model` keeps its adapter. Needs the memory of a second model."""
    return copy.deepcopy(model).merge_and_unload()


def unwrap(model: PeftModel) -> nn.Module:
    """The plain model again, without the adapter (for undoing a failed `wrap`)."""
    return model.unload()
