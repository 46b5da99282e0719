"""Pieces every recipe uses, as plain functions: settings shared by the training recipes, the
optimizer and schedule, exact-resume checkpoints, metrics, and per-item seeding.

No trainer base class: each recipe is one readable script that calls these.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from recipes.config import ConfigError, load_config


@dataclass
class TrainSettings:
    """Settings every training recipe has. Defaults are the original BLIP-2 stage-1 values."""

    output_dir: str
    train_data: str  # annotation file (JSON/JSONL/CSV) or image folder with metadata.jsonl
    image_root: str | None = None  # base of relative image paths (default: the annotation's folder)
    feature_cache: str | None = None  # train from `qformer cache-features` output instead of pixels
    on_bad_sample: Literal["error", "skip"] = "error"
    num_workers: int = 0
    # --- optimisation (AdamW, linear warm-up then cosine decay, per step) ---
    batch_size: int = 100  # per process
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_steps: int = 5000
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = None
    # "auto": bf16 on GPUs that support it, none on CPUs (fp32)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    seed: int = 42
    # --- bookkeeping ---
    log_every: int = 10
    save_every: int = 1000  # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 2
    resume_from: str | None = None  # a checkpoint directory, or "latest" in output_dir
    # Read the annotations lazily (JSONL/CSV line by line), split by process, shuffled in a buffer:
    # for sets larger than memory. Resume skips the records already seen (no image decoding).
    streaming: bool = False
    shuffle_buffer: int = 10_000

    def problems(self) -> list[str]:
        p = []
        for name in ("batch_size", "grad_accum", "max_steps", "log_every", "save_every"):
            if getattr(self, name) <= 0:
                p.append(f"`{name}` must be positive, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            p.append(f"`warmup_steps` must be >= 0, got {self.warmup_steps}")
        if not self.min_lr <= self.lr:
            p.append(f"`min_lr` ({self.min_lr}) must not exceed `lr` ({self.lr})")
        if self.streaming and self.feature_cache:
            p.append("`streaming` reads images; it does not combine with `feature_cache` (unset one)")
        return p


def check(settings: Any) -> None:
    problems = settings.problems()
    if problems:
        raise ConfigError(f"Invalid {type(settings).__name__}:\n  - " + "\n  - ".join(problems))


# ------------------------------------------------------------------------------------------
# optimizer and schedule
# ------------------------------------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters only; no weight decay on biases, norms and other 1-D parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warm-up from `warmup_lr` to `lr`, then cosine decay to `min_lr` at `max_steps`."""
    if step < s.warmup_steps:
        return s.warmup_lr + (s.lr - s.warmup_lr) * step / s.warmup_steps
    span = max(1, s.max_steps - s.warmup_steps)
    progress = min(1.0, (step - s.warmup_steps) / span)
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1 + math.cos(math.pi * progress))


def mixed_precision_for(setting: str, device: torch.device) -> str:
    if setting != "auto":
        return setting
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"  # CPUs: fp32 (bf16 is emulated on most of them)


# ------------------------------------------------------------------------------------------
# per-item seeding: augmentation that does not depend on workers, order or resumption
# ------------------------------------------------------------------------------------------
def item_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + index) % (2**63 - 1)


class SeededItems(torch.utils.data.Dataset):
    """Wraps a dataset so item (index, seed) is produced under torch's RNG seeded with `seed`:
    random crops and flips are then a function of (run seed, epoch, index) only, so a resumed run
    or a different number of workers sees exactly the same augmented images."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only, which is what fork_rng(devices=[]) restores: torch.manual_seed
            # would also reseed (and leak into) CUDA's, and on a machine without CUDA it records a
            # stack trace for the deferred CUDA call: 1.7 s of the 2.2 s the stage-1 data loader
            # took in a 40-step profile
            torch.random.default_generator.manual_seed(seed)
            random_state = random.getstate()
            random.seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(random_state)


class SeededBatches:
    """A batch sampler for `SeededItems`: the sampler's batches for steps start..total-1, each
    index paired with its item seed. Lazy, so a long run holds one batch of keys at a time."""

    def __init__(self, sampler, seed: int, start_step: int, total_steps: int) -> None:
        self.sampler, self.seed, self.start, self.total = sampler, seed, start_step, total_steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for epoch, _, indices in self.sampler.iter_steps(self.start, self.total):
            yield [(i, item_seed(self.seed, epoch, i)) for i in indices]

    def __len__(self) -> int:
        return self.total - self.start


def full_batch(batch: dict[str, Any], size: int, num_processes: int) -> dict[str, Any]:
    """With several processes, every process must bring a batch of the same size to the
    cross-process gathers; a batch shortened by skipped samples is filled up by repeating its own
    items. The repeats share their image id, so ITC treats them as the same image (soft targets)
    and ITM never takes one as the other's negative."""
    n = len(batch["caption"])
    if n == 0:
        raise RuntimeError(
            f"Every sample of a batch was unreadable ({len(batch.get('skipped', []))} skipped): "
            "check the data (the skip report lists the files)."
        )
    if num_processes == 1 or n == size:
        return batch
    order = [i % n for i in range(size)]
    return {
        k: (v[order] if isinstance(v, Tensor) else [v[i] for i in order]) if k != "skipped" else v
        for k, v in batch.items()
    }


def streaming_batches(
    s: TrainSettings, *, rank: int, world_size: int, transform, start_step: int, captions_only: bool = False
) -> Iterator[dict[str, Any]]:
    """Batches of this process's share of a streamed annotation file, endlessly (epoch after
    epoch, each shuffled in a buffer with seed + epoch). Step k's batch is the same whether the
    run got there directly or resumed at k: the records before it are skipped, not decoded, and
    augmentation is seeded by (seed, step, position). `captions_only`: leave question-answer
    records out (stage 1 learns from captions)."""
    import datasets

    from qformer.data import PAIRS_FEATURES, ImageTextDataset, collate, stream_pairs

    stream = stream_pairs(s.train_data, image_root=s.image_root, rank=rank, world_size=world_size)
    description = stream.info.description
    if captions_only:
        stream = stream.filter(lambda question: not question, input_columns="question")
    step, epoch = 0, 0
    while True:
        shuffled = stream.shuffle(seed=s.seed + epoch, buffer_size=s.shuffle_buffer)
        chunk: list[dict[str, Any]] = []
        produced = False
        for record in shuffled:
            chunk.append(record)
            if len(chunk) < s.batch_size:
                continue
            if step >= start_step:
                pairs = datasets.Dataset.from_list(chunk, features=PAIRS_FEATURES)
                pairs.info.description = description
                items = SeededItems(ImageTextDataset(pairs, transform, on_bad_sample=s.on_bad_sample))
                yield collate([items[(i, item_seed(s.seed, step, i))] for i in range(len(chunk))])
            step, chunk, produced = step + 1, [], True
        if not produced:
            raise ValueError(f"{s.train_data}: this process's share holds fewer than batch_size={s.batch_size} pairs.")
        epoch += 1


# ------------------------------------------------------------------------------------------
# checkpoints for exact resume: safetensors and JSON only, no pickles
# ------------------------------------------------------------------------------------------
def save_training_state(
    directory: Path,
    *,
    optimizer: torch.optim.Optimizer,
    named_params: dict[str, nn.Parameter],
    step: int,
    settings: dict[str, Any],
    rank: int,
    is_main: bool,
) -> None:
    """Optimizer moments, step, settings and RNG states (one file per process)."""
    directory.mkdir(parents=True, exist_ok=True)
    if is_main:
        names = {id(p): n for n, p in named_params.items()}
        tensors: dict[str, Tensor] = {}
        for p, state in optimizer.state.items():
            for key, value in state.items():
                tensors[f"{names[id(p)]}::{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
            for g in optimizer.param_groups
        ]
        save_file(tensors, str(directory / "optimizer.safetensors"))
        meta = {"step": step, "param_groups": groups, "settings": settings}
        (directory / "trainer_state.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(directory / f"rng-{rank}.safetensors"))
    np_state = np.random.get_state()
    py_state = random.getstate()
    (directory / f"rng-{rank}.json").write_text(
        json.dumps({"python": [py_state[0], list(py_state[1]), py_state[2]],
                    "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]})  # fmt: skip
    )


def read_trainer_state(directory: Path) -> dict[str, Any]:
    path = directory / "trainer_state.json"
    if not path.is_file():
        raise ConfigError(f"{directory} is not a training checkpoint: no trainer_state.json in it.")
    return json.loads(path.read_text())


def load_training_state(
    directory: Path,
    *,
    optimizer: torch.optim.Optimizer,
    named_params: dict[str, nn.Parameter],
    rank: int,
) -> dict[str, Any]:
    """Restore what `save_training_state` wrote; returns trainer_state.json. The optimizer's
    parameters must be the saved ones, by name and group (LoRA adapters included)."""
    meta = read_trainer_state(directory)
    tensors = load_file(str(directory / "optimizer.safetensors"))
    names = {id(p): n for n, p in named_params.items()}
    ours = [sorted(names.get(id(p), "?") for p in g["params"]) for g in optimizer.param_groups]
    theirs = [sorted(g["params"]) for g in meta["param_groups"]]
    if ours != theirs:
        gone = sorted({n for g in theirs for n in g} - {n for g in ours for n in g})
        new = sorted({n for g in ours for n in g} - {n for g in theirs for n in g})
        raise ConfigError(
            f"Cannot resume from {directory}: the optimizer there trained other parameters than this model's "
            f"(only there: {gone[:5]}; only here: {new[:5]}). Resume with the settings it was trained with."
        )
    for group, saved in zip(optimizer.param_groups, meta["param_groups"]):
        for k, v in saved.items():
            if k != "params":
                group[k] = v
    for key, value in tensors.items():
        name, _, field = key.rpartition("::")
        p = named_params[name]
        optimizer.state[p][field] = value.to(p.device) if value.dim() else value
    rng = load_file(str(directory / f"rng-{rank}.safetensors"))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    states = json.loads((directory / f"rng-{rank}.json").read_text())
    py = states["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = states["numpy"]
    np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), *npst[2:]))
    return meta


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    return sorted((output_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def resolve_resume(resume_from: str | None, output_dir: Path) -> Path | None:
    if resume_from is None:
        return None
    if resume_from == "latest":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    path = Path(resume_from)
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(f"resume_from={resume_from}: no trainer_state.json there; give a checkpoints/step-N folder.")
    return path


# ------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------
class MetricsLog:
    """One JSON line per logged step in `metrics.jsonl`, and TensorBoard when it is installed."""

    def __init__(self, output_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            output_dir.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:
                pass
        self.started = time.perf_counter()

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: round(float(v), 6) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------
# running a recipe
# ------------------------------------------------------------------------------------------
def run(recipe: Any) -> dict[str, float]:
    """setup, train, cleanup; returns the last logged losses."""
    recipe.setup()
    last = recipe.train()
    recipe.cleanup()
    return last


def main(settings_cls: type, recipe_cls: type, argv: list[str]) -> int:
    """A recipe's command line: `CONFIG [key=value ...]`."""
    if not argv:
        print("usage: qformer train CONFIG [key=value ...]", file=sys.stderr)
        return 2
    recipe = recipe_cls(load_config(settings_cls, argv[0], argv[1:]))
    run(recipe)
    recipe.acc.end_training()  # destroys the process group (if any) before interpreter exit tears it down
    return 0
