"""Strict weight loading and safetensors checkpoints.

Loading never guesses: every key that is missing, unexpected or of the wrong shape is reported by
name, and `strict=True` (the default) turns any of them into one error listing all of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint (a, b) vs model (c, d)"
    # keys deliberately left out (e.g. a vision tower's weights when only the Q-Former is read),
    # with the reason; they are not errors
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 20) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        for name, keys in (("missing", self.missing), ("unexpected", self.unexpected), ("wrong shape", self.mismatched)):
            if keys:
                shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
                lines.append(f"{len(keys)} {name}: {shown}")
        if self.skipped:
            reasons = sorted(set(self.skipped.values()))
            lines.append(f"{len(self.skipped)} skipped ({'; '.join(reasons)})")
        return "\n".join(lines)


class CheckpointError(ValueError):
    pass


def load_state_dict_strict(
    module: nn.Module | dict[str, Tensor],
    state_dict: dict[str, Tensor],
    *,
    strict: bool = True,
    allow_missing: tuple[str, ...] = (),
    source: str = "checkpoint",
) -> LoadReport:
    """Copy `state_dict` into `module` (a module, or a dict of its tensors to fill in place, for
    loading a subset such as the trainable weights), checking names and shapes.

    allow_missing: key prefixes that may be absent (left as initialised) without failing, e.g. the
    cross-attention when initialising from a text-only BERT. They are still reported as missing.
    """
    own = module if isinstance(module, dict) else module.state_dict()
    target = "the model" if isinstance(module, dict) else type(module).__name__
    report = LoadReport()
    for key, value in state_dict.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            report.mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}")
        else:
            report.loaded.append(key)
    report.missing = [k for k in own if k not in state_dict]
    fatal_missing = [k for k in report.missing if not k.startswith(allow_missing)] if allow_missing else report.missing
    if strict and (fatal_missing or report.unexpected or report.mismatched):
        raise CheckpointError(
            f"Cannot load {source} into {target}:\n{report.summary()}\n"
            "The checkpoint was made for another architecture or config; build the model from the "
            "checkpoint's own config.json, or convert the checkpoint with `qformer.convert`."
        )
    with torch.no_grad():
        for key in report.loaded:
            own[key].copy_(state_dict[key])
    return report


def save_model(module: nn.Module | dict[str, Tensor], directory: str | Path, config: dict) -> Path:
    """Write `config.json` and `model.safetensors` (every tensor of `module`, or the given dict)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    tensors = module if isinstance(module, dict) else module.state_dict()
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(directory / WEIGHTS_NAME))
    return directory


def read_model_dir(directory: str | Path) -> tuple[dict, dict[str, Tensor]]:
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: a qformer checkpoint directory holds {CONFIG_NAME} and {WEIGHTS_NAME}."
            )
    return json.loads(config_path.read_text()), load_file(str(weights_path))
