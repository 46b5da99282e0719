"""BLIP (the baseline recipe): pre-training with ITC + ITM + LM, and the two fine-tunings of CapFilt.

    qformer train recipes/configs/blip_pretrain_vitb16.yaml [key=value ...]     # recipe: blip_pretrain
    qformer train recipes/configs/blip_caption_coco.yaml init_from=DIR          # recipe: blip_caption
    qformer train recipes/configs/blip_retrieval_coco.yaml init_from=DIR        # recipe: blip_retrieval

One class for the three, read top to bottom (a copy of the stage-1 recipe, edited): `__init__`
checks the settings, `setup()` builds (or loads) the model, data and optimizer, `train()` runs the
steps, `save_checkpoint()` writes what an exact resume needs, `cleanup()` closes the logs.

* `blip_pretrain`: ITC (momentum encoders, feature queue, momentum distillation with alpha ramped
  from 0 over the first epoch), ITM (hard negatives) and LM, summed; the ViT trains.
* `blip_caption`: LM only: the captioner of CapFilt (BLIP's caption fine-tuning).
* `blip_retrieval`: ITC + ITM with image ids (alpha ramped over two epochs): the filter of CapFilt.

The resume checkpoint holds every weight, the momentum encoders and the queue with its pointer
included (safetensors), plus optimizer, step and RNG states; `output_dir/model` holds the parts
the recipe's use needs (`save_parts`). Unlike BLIP-2's recipes there is no feature cache: the ViT
trains, so every step reads pixels.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from tqdm.auto import tqdm

from qformer.optim import adamw
from recipes import common
from recipes.config import ConfigError, differences, to_dict

if TYPE_CHECKING:
    from qformer.blip import BlipModel

RecipeName = Literal["blip_pretrain", "blip_caption", "blip_retrieval"]
RECIPE_NAMES: tuple[str, ...] = ("blip_pretrain", "blip_caption", "blip_retrieval")
OBJECTIVES: dict[str, tuple[str, ...]] = {
    "blip_pretrain": ("itc", "itm", "lm"),
    "blip_caption": ("lm",),
    "blip_retrieval": ("itc", "itm"),
}
# What `output_dir/model` keeps by default: a captioner has no use for the ITC/ITM heads (stale after
# LM-only training), a filter none for the decoder (its shared layers moved under ITC/ITM). The
# fine-tuned models leave out the momentum copies (inference artefacts); the resume checkpoints
# always hold everything.
SAVED_PARTS: dict[str, tuple[str, ...]] = {
    "blip_pretrain": ("vision", "text", "itc", "itm", "decoder", "momentum"),
    "blip_caption": ("vision", "text", "decoder"),
    "blip_retrieval": ("vision", "text", "itc", "itm"),
}
# alpha reaches its final value after this many epochs (BLIP: 1 in pre-training, 2 in retrieval)
RAMP_EPOCHS = {"blip_pretrain": 1, "blip_caption": 0, "blip_retrieval": 2}
# BlipConfig fields a fine-tuning may change on a loaded checkpoint (the rest fix its architecture)
TUNABLE_FIELDS = (
    "prompt", "queue_size", "momentum", "alpha", "label_smoothing", "hidden_dropout", "attention_dropout",
    "temp_min", "temp_max", "itm_positive_weight",
)  # fmt: skip
# settings that may change between a run and its resumption
RESUMABLE_CHANGES = ("output_dir", "resume_from", "max_steps", "save_every", "log_every", "num_workers", "keep_checkpoints")


@dataclass
class BlipSettings(common.TrainSettings):
    recipe: RecipeName = "blip_pretrain"
    # --- where the model comes from: a BLIP checkpoint (fine-tuning, or more pre-training) ...
    init_from: str | None = None
    # ... or built here (pre-training): the ViT as `VisionBridge.from_spec` takes it (it trains),
    # and the BERT checkpoint that initialises the text model and gives the tokenizer. bert null: a
    # random text model from `blip_preset` with `tokenizer`.
    vision: dict[str, Any] = field(default_factory=dict)
    bert: str | None = None
    tokenizer: str | None = None
    blip_preset: str = "blip_base"
    # BlipConfig fields on top (share_encoder_decoder, queue_size, alpha, momentum, prompt, ...);
    # with `init_from` only the tunable ones (prompt, queue_size, momentum, alpha, dropouts, ...)
    blip: dict[str, Any] = field(default_factory=dict)
    max_text_len: int = 30  # BLIP: 30 tokens in pre-training, 35 in retrieval fine-tuning
    # alpha's ramp length in steps; null: one epoch (blip_pretrain) or two (blip_retrieval)
    alpha_ramp_steps: int | None = None
    # captions of the same image (or of records with the same `group`) are positives for ITC and
    # never ITM negatives (BLIP's retrieval fine-tuning; its pre-training treats every pair on its own)
    use_image_ids: bool = False
    # Random resized crop and horizontal flip, as BLIP trains; false: the eval transform (for data
    # whose captions name positions, which a flip or a crop would make false).
    augment: bool = True
    save_parts: list[str] | None = None  # parts kept in output_dir/model; null: the recipe's default

    def problems(self) -> list[str]:
        from qformer.blip import BLIP_PRESETS, PARTS

        p = super().problems()
        if self.feature_cache:
            p.append("BLIP trains its ViT, so it reads pixels: unset `feature_cache`")
        if self.init_from is None:
            if self.recipe != "blip_pretrain":
                p.append(f"`{self.recipe}` fine-tunes a BLIP model: set `init_from` (e.g. a blip_pretrain run's model/)")
            else:
                if not self.vision:
                    p.append("set `vision` (the ViT to train, as {source, name, pretrained, layer}) or `init_from`")
                if self.bert is None and self.tokenizer is None:
                    p.append("without `bert`, set `tokenizer` (a BERT-style tokenizer to add [DEC] and [ENC] to)")
                if self.bert is None and self.blip_preset not in BLIP_PRESETS:
                    p.append(f"`blip_preset` {self.blip_preset!r} is not one of {sorted(BLIP_PRESETS)}")
        else:
            fixed = sorted(set(self.blip) - set(TUNABLE_FIELDS))
            if fixed:
                p.append(
                    f"`blip` sets {fixed}, which fix the architecture of the `init_from` checkpoint; a "
                    f"fine-tuning may only change {list(TUNABLE_FIELDS)}"
                )
        if self.alpha_ramp_steps is not None and self.alpha_ramp_steps < 0:
            p.append(f"`alpha_ramp_steps` must be >= 0, got {self.alpha_ramp_steps}")
        if self.streaming and self.alpha_ramp_steps is None and "itc" in OBJECTIVES[self.recipe]:
            p.append("`streaming` data has no known epoch length: set `alpha_ramp_steps`")
        unknown = sorted(set(self.save_parts or ()) - set(PARTS))
        if unknown:
            p.append(f"`save_parts` {unknown} are not parts of a BLIP model; choose from {list(PARTS)}")
        if self.max_text_len < 2:
            p.append(f"`max_text_len` must be at least 2 ([CLS] and [SEP]), got {self.max_text_len}")
        return p


class BlipRecipe:
    def __init__(self, settings: BlipSettings) -> None:
        common.check(settings)
        self.s = settings
        self.output_dir = Path(settings.output_dir)
        self.objectives = OBJECTIVES[settings.recipe]

    # ------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, set_seed

        from qformer.data import GlobalBatchSampler, ImageTextDataset, SkipReport, load_pairs

        s = self.s
        # Some trainable weights get no gradient: the text encoder's self-attention under LM alone,
        # and a transformers ViT's final norm and pooler (we read a block's output). DDP must not
        # wait for them.
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
        probe = Accelerator(kwargs_handlers=[ddp])  # to learn the device before choosing the precision
        mp = common.mixed_precision_for(s.mixed_precision, probe.device)
        self.acc = acc = probe if mp == probe.mixed_precision else Accelerator(mixed_precision=mp, kwargs_handlers=[ddp])
        set_seed(s.seed)
        self.log = common.MetricsLog(self.output_dir, enabled=acc.is_main_process)

        # step 1: the model: loaded (fine-tuning) or built around a trainable ViT and BERT
        model = self._load_model() if s.init_from else self._build_model()
        world_batch = s.batch_size * acc.num_processes
        if "itc" in self.objectives and model.config.queue_size % world_batch:
            raise ConfigError(
                f"The feature queue ({model.config.queue_size}) must be a multiple of the world batch "
                f"({world_batch} = batch_size {s.batch_size} x {acc.num_processes} processes): change "
                f"`batch_size` or `blip.queue_size`."
            )
        self.trainable = _train_only(model, self.objectives)

        # step 2: data: one global batch per step, each process a contiguous slice of it
        transform = model.vision.train_transform() if s.augment else model.vision.eval_transform()
        self.transform = transform
        self.dataset = self.sampler = None
        if not s.streaming:
            pairs = load_pairs(s.train_data, image_root=s.image_root)
            questions = sum(map(bool, pairs["question"]))
            if questions:  # a mixture with VQA records: BLIP learns from the captions
                pairs = pairs.filter(lambda question: not question, input_columns="question")
                if acc.is_main_process:
                    print(f"{s.recipe} trains on captions: left out {questions} question-answer records of {s.train_data}")
                if len(pairs) == 0:
                    raise ConfigError(f"{s.train_data} holds only question-answer records; BLIP needs captions.")
            self.dataset = ImageTextDataset(pairs, transform, on_bad_sample=s.on_bad_sample)
            self.sampler = GlobalBatchSampler(
                len(self.dataset), batch_size=s.batch_size, rank=acc.process_index, world_size=acc.num_processes,
                seed=s.seed,
            )  # fmt: skip
        self.skips = SkipReport()
        if s.alpha_ramp_steps is not None:
            self.ramp_steps = s.alpha_ramp_steps
        else:
            self.ramp_steps = RAMP_EPOCHS[s.recipe] * (self.sampler.steps_per_epoch if self.sampler else 0)

        # step 3: optimizer over exactly the parameters the objectives train
        optimizer = adamw(common.param_groups(model, s.weight_decay), lr=s.lr, betas=s.betas, device=acc.device)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.start_step = 0
        resume = common.resolve_resume(s.resume_from, self.output_dir)
        if resume is not None:
            self._resume(resume)

    def _build_model(self) -> BlipModel:
        from bridges.vision import VisionBridge
        from qformer.blip import BlipConfig, BlipModel, init_from_bert, load_blip_tokenizer

        s, acc = self.s, self.acc
        vision = VisionBridge.from_spec(s.vision, device=acc.device, trainable=True)
        spec = vision.spec  # absolute paths, so the checkpoint loads from any folder
        fields = {
            "vision_source": spec["source"], "vision_name": spec["name"], "vision_pretrained": spec.get("pretrained"),
            "vision_layer": spec.get("layer", -1), "vision_width": vision.width,
        }  # fmt: skip
        if s.bert:
            config = BlipConfig.from_bert(s.bert, **fields, **s.blip)
            tokenizer = load_blip_tokenizer(s.bert)
        else:
            tokenizer = load_blip_tokenizer(s.tokenizer)
            config = BlipConfig.from_name(s.blip_preset, **{**fields, **s.blip}).with_tokenizer(tokenizer)
        model = BlipModel(config, tokenizer, vision=vision, device=acc.device)
        if s.bert:
            report = init_from_bert(model, s.bert)
            if acc.is_main_process:
                print(f"initialised the text model from {s.bert}: {report.summary().splitlines()[0]}")
        return model

    def _load_model(self) -> BlipModel:
        from qformer.blip import BlipModel

        s = self.s
        need = {"blip_pretrain": "train", "blip_caption": "caption", "blip_retrieval": ("retrieval", "itm")}[s.recipe]
        model = BlipModel.from_pretrained(s.init_from, need=need, device=self.acc.device)
        return reconfigured(model, s.blip) if s.blip else model

    def _resume(self, directory: Path) -> None:
        from qformer.blip import part_of
        from qformer.checkpoint import load_state_dict_strict, read_model_dir

        meta_settings = common.read_trainer_state(directory)["settings"]
        diffs = differences(meta_settings, to_dict(self.s), ignore=RESUMABLE_CHANGES)
        if diffs:
            raise ConfigError(
                f"Cannot resume from {directory}: it was trained with other settings:\n  - " + "\n  - ".join(diffs)
            )
        model = self.acc.unwrap_model(self.model)
        saved, state_dict = read_model_dir(directory / "model")
        parts = set(saved["parts"])
        own = {k: v for k, v in model.state_dict().items() if part_of(k) in parts}
        # momentum encoders, the queue and its pointer come back with the weights
        load_state_dict_strict(own, state_dict, source=str(directory))
        meta = common.load_training_state(
            directory, optimizer=self.optimizer, named_params=dict(model.named_parameters()), rank=self.acc.process_index
        )
        self.start_step = meta["step"]
        if self.acc.is_main_process:
            print(f"resumed from {directory} at step {self.start_step}")

    # ------------------------------------------------------------------------------ train
    def train(self) -> dict[str, float]:
        from qformer.data import collate

        s, acc = self.s, self.acc
        # micro-batches: grad_accum of them per optimizer step
        if s.streaming:
            batches = common.streaming_batches(
                s, rank=acc.process_index, world_size=acc.num_processes, transform=self.transform,
                start_step=self.start_step * s.grad_accum, captions_only=True,
            )  # fmt: skip
        else:
            keys = common.SeededBatches(self.sampler, s.seed, self.start_step * s.grad_accum, s.max_steps * s.grad_accum)
            batches = iter(torch.utils.data.DataLoader(
                common.SeededItems(self.dataset),
                batch_sampler=keys,
                collate_fn=collate,
                num_workers=s.num_workers,
                # its own generator: creating the iterator must not draw from the global RNG, or a
                # resumed run would sample other ITM negatives than the uninterrupted one
                generator=torch.Generator().manual_seed(s.seed),
            ))  # fmt: skip
        self.model.train()
        bar = tqdm(total=s.max_steps, initial=self.start_step, disable=not acc.is_main_process, desc=s.recipe)
        window: dict[str, float] = {}
        window_steps, seen, t0 = 0, 0, time.perf_counter()
        last: dict[str, float] = {}
        for step in range(self.start_step, s.max_steps):
            lr = common.lr_at(step, s)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            alpha = self._alpha(step)
            for micro in range(s.grad_accum):
                batch = next(batches)
                self.skips.add(batch)
                batch = full_batch(batch, s.batch_size)
                losses = self._losses(batch, alpha)
                sync = micro == s.grad_accum - 1
                with contextlib.nullcontext() if sync else acc.no_sync(self.model):
                    acc.backward(losses["loss"] / s.grad_accum)
                for k, v in losses.items():
                    window[k] = window.get(k, 0.0) + v.item() / s.grad_accum
                seen += len(batch["caption"]) * acc.num_processes
            if s.max_grad_norm is not None:
                acc.clip_grad_norm_(self.trainable, s.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

            done, window_steps = step + 1, window_steps + 1
            if done % s.log_every == 0 or done == s.max_steps:
                last = {k: v / window_steps for k, v in window.items()}
                rate = seen / (time.perf_counter() - t0)
                extra = {"alpha": alpha} if alpha is not None else {}
                self.log.log(done, {**last, **extra, "lr": lr, "samples_per_s": rate})
                bar.set_postfix({k: f"{v:.3f}" for k, v in last.items()} | {"img/s": f"{rate:.1f}"})
                window, window_steps, seen, t0 = {}, 0, 0, time.perf_counter()
            bar.update(1)
            if done % s.save_every == 0 or done == s.max_steps:
                self.save_checkpoint(done)
        bar.close()
        return last

    def _alpha(self, step: int) -> float | None:
        from qformer.blip import alpha_ramp

        if "itc" not in self.objectives:
            return None
        return alpha_ramp(step, self.ramp_steps, final=self.acc.unwrap_model(self.model).config.alpha)

    def _losses(self, batch: dict[str, Any], alpha: float | None) -> dict[str, torch.Tensor]:
        s, acc = self.s, self.acc
        model = acc.unwrap_model(self.model)
        input_ids, attention_mask = model.tokenize(batch["caption"], max_length=s.max_text_len)
        image_ids = batch.get("group_id", batch["image_id"]).to(acc.device) if s.use_image_ids else None
        with acc.autocast():
            return self.model(
                batch["pixel_values"].to(acc.device), input_ids, attention_mask,
                image_ids=image_ids, alpha=alpha, objectives=self.objectives,
            )  # fmt: skip

    # ------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int) -> Path:
        acc = self.acc
        directory = self.output_dir / "checkpoints" / f"step-{step:07d}"
        model = acc.unwrap_model(self.model)
        extra = {"recipe": self.s.recipe, "step": step}
        if acc.is_main_process:  # every part the model has: the momentum encoders and the queue too
            model.save_pretrained(directory / "model", extra=extra)
        common.save_training_state(
            directory,
            optimizer=self.optimizer,
            named_params=dict(model.named_parameters()),
            step=step,
            settings=to_dict(self.s),
            rank=acc.process_index,
            is_main=acc.is_main_process,
        )
        acc.wait_for_everyone()
        if acc.is_main_process:
            if step == self.s.max_steps:  # the final model, where fine-tuning, capfilt and eval look
                shutil.rmtree(self.output_dir / "model", ignore_errors=True)
                wanted = self.s.save_parts or SAVED_PARTS[self.s.recipe]
                parts = [p for p in wanted if p not in model.missing_parts]
                model.save_pretrained(self.output_dir / "model", parts=parts, extra=extra)
            for old in common.checkpoint_dirs(self.output_dir)[: -self.s.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return directory

    def cleanup(self) -> None:
        self.log.close()
        if self.acc.is_main_process and self.skips.count:
            print(self.skips.summary())


# ------------------------------------------------------------------------------------------
# helpers of this recipe
# ------------------------------------------------------------------------------------------
def _train_only(model: BlipModel, objectives: tuple[str, ...]) -> list[torch.nn.Parameter]:
    """Freeze the heads that `objectives` never reach (ITC projections and temperature without
    ITC, the ITM head without ITM, the decoder's own weights and the LM head without LM), so the
    optimizer sees only what trains. Returns the trainable parameters."""
    from qformer.blip import PARTS

    unused = [p for p, obj in (("itc", "itc"), ("itm", "itm"), ("decoder", "lm")) if obj not in objectives]
    prefixes = tuple(prefix for part in unused for prefix in PARTS[part])
    for name, param in model.named_parameters():
        if name.startswith(prefixes):
            param.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def reconfigured(model: BlipModel, overrides: dict[str, Any]) -> BlipModel:
    """`model` rebuilt with BlipConfig fields changed (only `TUNABLE_FIELDS`: e.g. the caption
    prompt, or a queue of another size, which starts fresh), every weight carried over."""
    from qformer.blip import BlipModel
    from qformer.checkpoint import load_state_dict_strict

    config = model.config.replace(**overrides)
    if config == model.config:
        return model
    fresh = BlipModel(config, model.tokenizer, vision=model.vision, device=model.temp.device)
    state = model.state_dict()
    new_queue = config.queue_size != model.config.queue_size
    if new_queue:
        state = {k: v for k, v in state.items() if not k.startswith("queue.")}
    load_state_dict_strict(fresh, state, allow_missing=("queue.",) if new_queue else (), source="the loaded model")
    fresh.missing_parts = set(model.missing_parts)
    return fresh


def full_batch(batch: dict[str, Any], size: int) -> dict[str, Any]:
    """A batch shortened by skipped samples, filled up to `size` by repeating its own items: the
    queue takes whole world batches only (with several processes the gathers also need equal
    batches). The repeats share their image id (ITC treats them as one image when
    `use_image_ids` is set) and ITM never takes an identical caption as a negative."""
    n = len(batch["caption"])
    if n == 0:
        raise RuntimeError(
            f"Every sample of a batch was unreadable ({len(batch.get('skipped', []))} skipped): "
            "check the data (the skip report lists the files)."
        )
    if n == size:
        return batch
    order = [i % n for i in range(size)]
    return {
        k: (v[order] if isinstance(v, torch.Tensor) else [v[i] for i in order]) if k != "skipped" else v
        for k, v in batch.items()
    }


def main(argv: list[str] | None = None) -> int:
    return common.main(BlipSettings, BlipRecipe, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
