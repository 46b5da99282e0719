"""Stage 1 of BLIP-2: representation learning with ITC, ITM and ITG against a frozen vision tower.

    qformer train recipes/configs/blip2_stage1_eva_vitg.yaml [key=value ...]

One class, read top to bottom: `__init__` checks the settings, `setup()` builds the tower (or
opens the feature cache), tokenizer, Q-Former, data and optimizer, `train()` runs the steps,
`save_checkpoint()` writes what an exact resume needs, `cleanup()` closes the logs.
Runs on one CPU, one GPU, or many processes under `accelerate launch` (DDP).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from qformer.optim import adamw
from recipes import common
from recipes.config import ConfigError, differences, to_dict

# settings that may change between a run and its resumption
RESUMABLE_CHANGES = ("output_dir", "resume_from", "max_steps", "save_every", "log_every", "num_workers", "keep_checkpoints")


@dataclass
class Stage1Settings(common.TrainSettings):
    recipe: Literal["stage1"] = "stage1"
    # The frozen tower, as `VisionBridge.from_spec` takes it. The original: EVA ViT-g/14, its
    # penultimate block (the last is dropped), 257 tokens of width 1408.
    vision: dict[str, Any] = field(
        default_factory=lambda: {"source": "open_clip", "name": "EVA01-g-14", "pretrained": "laion400m_s11b_b41k", "layer": -2}
    )
    # BERT checkpoint that initialises the trunk and gives the tokenizer (hub name or local dir).
    # null: a randomly initialised trunk from `qformer_preset`, with `tokenizer`.
    bert: str | None = "bert-base-uncased"
    # a stage-1 checkpoint (a run's `model/`) to go on training from, with new settings: BLIP-2
    # fine-tunes its pre-trained stage 1 for retrieval this way. Its architecture and tokenizer
    # are kept (`bert`, `tokenizer`, `qformer_preset` are then not read; `qformer` must agree).
    init_from: str | None = None
    tokenizer: str | None = None
    qformer_preset: str = "blip2"
    # QFormerConfig fields on top (num_query_tokens, cross_attention_freq, embed_dim, dropouts...)
    qformer: dict[str, Any] = field(default_factory=dict)
    max_text_len: int = 32
    itm_negatives: Literal["sample", "hardest"] = "sample"
    # ITM also draws negatives from this many items of earlier batches (0: the batch alone, as the
    # original, whose batch is gathered over 16 GPUs); see `qformer.stage1.NegativePool`
    itm_negative_pool: int = 0
    itc_gather_grad: bool = False  # the original gathers ITC features without gradient
    # weights of the three objectives in the summed loss, e.g. {itm: 3}; missing ones are 1 (the
    # original: all 1). The logged per-objective losses stay unweighted.
    loss_weights: dict[str, float] = field(default_factory=dict)
    # captions of the same image, or of records with the same `group`, are not each other's negatives
    use_image_ids: bool = True
    # records 2k and 2k + 1 of `train_data` are hard negatives of each other (ShapesWorld's shape
    # twins, `generate_world(twins=True)`): keep each pair in one batch, so that ITC and ITM's
    # negative sampling meet it there
    batch_in_pairs: bool = False

    def problems(self) -> list[str]:
        p = super().problems()
        if self.init_from is None and self.bert is None and self.tokenizer is None:
            p.append("without `bert`, set `tokenizer` (a BERT-style tokenizer to add [DEC] to)")
        if self.feature_cache is None and not self.vision:
            p.append("set `vision` (the frozen tower) or `feature_cache`")
        if self.itm_negative_pool < 0:
            p.append(f"`itm_negative_pool` must be 0 (off) or a number of items, got {self.itm_negative_pool}")
        if self.itm_negative_pool and not self.use_image_ids:
            p.append("`itm_negative_pool` needs `use_image_ids: true` (to keep an image's own captions out of its negatives)")
        from qformer.stage1 import check_loss_weights

        try:
            check_loss_weights(self.loss_weights)
        except ValueError as e:
            p.append(str(e))
        if self.batch_in_pairs and self.streaming:
            p.append("`batch_in_pairs` shuffles pairs of records, which a stream cannot: set `streaming: false`")
        if self.batch_in_pairs and self.batch_size % 2:
            p.append(f"`batch_in_pairs` keeps pairs in one batch: `batch_size` must be even, got {self.batch_size}")
        return p


class Stage1Recipe:
    def __init__(self, settings: Stage1Settings) -> None:
        common.check(settings)
        self.s = settings
        self.output_dir = Path(settings.output_dir)

    # ------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from bridges.vision import VisionBridge
        from qformer.bert_init import config_from_bert, init_from_bert, load_tokenizer
        from qformer.checkpoint import load_state_dict_strict
        from qformer.config import QFormerConfig
        from qformer.data import GlobalBatchSampler, ImageTextDataset, SkipReport, load_pairs
        from qformer.feature_cache import CachedPairsDataset, FeatureCache
        from qformer.stage1 import Stage1Model

        s = self.s
        probe = Accelerator()  # to learn the device before choosing the precision
        mp = common.mixed_precision_for(s.mixed_precision, probe.device)
        self.acc = acc = Accelerator(mixed_precision=mp) if mp != probe.mixed_precision else probe
        set_seed(s.seed)
        self.log = common.MetricsLog(self.output_dir, enabled=acc.is_main_process)

        # step 1: the frozen tower, or the cache of its tokens
        if s.feature_cache:
            self.cache = FeatureCache(s.feature_cache)
            self.vision, self.vision_spec, width = None, self.cache.spec, self.cache.width
        else:
            self.cache = None
            self.vision = VisionBridge.from_spec(s.vision, device=acc.device)
            self.vision_spec, width = self.vision.spec, self.vision.width

        # step 2: tokenizer and Q-Former (from a stage-1 checkpoint, from BERT, or random from a preset)
        start = _read_init_from(s.init_from, width, "feature cache" if self.cache else "tower", s.qformer) if s.init_from else None
        self.tokenizer = load_tokenizer(Path(s.init_from) / "tokenizer" if start else s.bert or s.tokenizer)
        if start:
            config = QFormerConfig.from_dict(start[0]["qformer"])
        elif s.bert:
            config = config_from_bert(s.bert, vision_width=width, **s.qformer)
        else:
            config = QFormerConfig.from_name(
                s.qformer_preset,
                **{
                    "vision_width": width,
                    "vocab_size": len(self.tokenizer),
                    "pad_token_id": self.tokenizer.pad_token_id,
                    "dec_token_id": self.tokenizer.bos_token_id,
                    **s.qformer,
                },
            )
        model = Stage1Model(config, itm_negatives=s.itm_negatives, itc_gather_grad=s.itc_gather_grad,
                            itm_negative_pool=s.itm_negative_pool, loss_weights=s.loss_weights)  # fmt: skip
        if start:
            load_state_dict_strict(model, start[1], source=s.init_from)
            if acc.is_main_process:
                print(f"initialised from the stage-1 checkpoint {s.init_from}")
        elif s.bert:
            report = init_from_bert(model, s.bert)
            if acc.is_main_process:
                print(f"initialised from {s.bert}: {report.summary().splitlines()[0]}")

        # step 3: data: one global batch per step, each process a contiguous slice of it
        # (streaming: read lazily in train(), each process its own share of the file)
        self.dataset = self.sampler = None
        if not s.streaming:
            pairs = load_pairs(s.train_data, image_root=s.image_root)
            questions = sum(map(bool, pairs["question"]))
            if questions:  # a stage-2 mixture of captions and VQA records: stage 1 takes the captions
                pairs = pairs.filter(lambda question: not question, input_columns="question")
                if acc.is_main_process:
                    print(f"stage 1 trains on captions: left out {questions} question-answer records of {s.train_data}")
                if len(pairs) == 0:
                    raise ConfigError(f"{s.train_data} holds only question-answer records; stage 1 needs captions.")
            if s.batch_in_pairs:
                _check_pairs(pairs["row"], s.train_data)
            if self.cache is not None:
                self.dataset = CachedPairsDataset(pairs, self.cache, on_bad_sample=s.on_bad_sample)
            else:
                self.dataset = ImageTextDataset(pairs, self.vision.train_transform(), on_bad_sample=s.on_bad_sample)
            self.sampler = GlobalBatchSampler(
                len(self.dataset), batch_size=s.batch_size, rank=acc.process_index, world_size=acc.num_processes,
                seed=s.seed, pairs=s.batch_in_pairs,
            )  # fmt: skip
        self.skips = SkipReport()

        # step 4: optimizer over exactly the trainable parameters
        optimizer = adamw(common.param_groups(model, s.weight_decay), lr=s.lr, betas=s.betas, device=acc.device)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.start_step = 0
        resume = common.resolve_resume(s.resume_from, self.output_dir)
        if resume is not None:
            self._resume(resume)

    def _resume(self, directory: Path) -> None:
        from qformer.checkpoint import load_state_dict_strict, read_model_dir

        meta_settings = common.read_trainer_state(directory)["settings"]
        diffs = differences(meta_settings, to_dict(self.s), ignore=RESUMABLE_CHANGES)
        if diffs:
            raise ConfigError(
                f"Cannot resume from {directory}: it was trained with other settings:\n  - " + "\n  - ".join(diffs)
            )
        model = self.acc.unwrap_model(self.model)
        _, state_dict = read_model_dir(directory / "model")
        load_state_dict_strict(model, state_dict, source=str(directory))
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
                s, rank=acc.process_index, world_size=acc.num_processes,
                transform=self.vision.train_transform(), start_step=self.start_step * s.grad_accum,
                captions_only=True,
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
        bar = tqdm(total=s.max_steps, initial=self.start_step, disable=not acc.is_main_process, desc="stage 1")
        window: dict[str, float] = {}
        window_steps, seen, t0 = 0, 0, time.perf_counter()
        last: dict[str, float] = {}
        for step in range(self.start_step, s.max_steps):
            lr = common.lr_at(step, s)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            for micro in range(s.grad_accum):
                batch = next(batches)
                self.skips.add(batch)
                batch = common.full_batch(batch, s.batch_size, acc.num_processes)
                losses = self._losses(batch)
                sync = micro == s.grad_accum - 1
                with contextlib.nullcontext() if sync else acc.no_sync(self.model):
                    acc.backward(losses["loss"] / s.grad_accum)
                for k, v in losses.items():
                    window[k] = window.get(k, 0.0) + v.item() / s.grad_accum
                seen += len(batch["caption"]) * acc.num_processes
            if s.max_grad_norm is not None:
                acc.clip_grad_norm_(self.model.parameters(), s.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

            done, window_steps = step + 1, window_steps + 1
            if done % s.log_every == 0 or done == s.max_steps:
                last = {k: v / window_steps for k, v in window.items()}
                rate = seen / (time.perf_counter() - t0)
                self.log.log(done, {**last, "lr": lr, "samples_per_s": rate})
                bar.set_postfix({k: f"{v:.3f}" for k, v in last.items()} | {"img/s": f"{rate:.1f}"})
                window, window_steps, seen, t0 = {}, 0, 0, time.perf_counter()
            bar.update(1)
            if done % s.save_every == 0 or done == s.max_steps:
                self.save_checkpoint(done)
        bar.close()
        return last

    def _losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        s, acc = self.s, self.acc
        if self.cache is not None:
            tokens = batch["image_tokens"].to(acc.device)
        else:
            tokens = self.vision(batch["pixel_values"].to(acc.device))  # frozen, no gradient
        text = self.tokenizer(
            batch["caption"], padding="longest", truncation=True, max_length=s.max_text_len, return_tensors="pt"
        ).to(acc.device)
        image_ids = batch.get("group_id", batch["image_id"]).to(acc.device) if s.use_image_ids else None
        with acc.autocast():
            return self.model(tokens, text.input_ids, text.attention_mask, image_ids=image_ids)

    # ------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int) -> Path:
        acc = self.acc
        directory = self.output_dir / "checkpoints" / f"step-{step:07d}"
        model = acc.unwrap_model(self.model)
        if acc.is_main_process:
            self._save_model(model, directory / "model")
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
            if step == self.s.max_steps:  # the final model, where stage 2 and `qformer eval` look
                shutil.rmtree(self.output_dir / "model", ignore_errors=True)
                shutil.copytree(directory / "model", self.output_dir / "model")
            for old in common.checkpoint_dirs(self.output_dir)[: -self.s.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return directory

    def _save_model(self, model, directory: Path) -> None:
        model.save_pretrained(directory, extra={"vision": self.vision_spec, "recipe": "stage1"})
        self.tokenizer.save_pretrained(directory / "tokenizer")

    def cleanup(self) -> None:
        self.log.close()
        if self.acc.is_main_process and self.skips.count:
            print(self.skips.summary())


def _read_init_from(directory: str, width: int, source: str, qformer: dict[str, Any]) -> tuple[dict, dict]:
    """(config, state dict) of the stage-1 checkpoint that `init_from` names, after checking that
    it is one, that it reads tokens as wide as this run's tower or feature cache gives, and that
    the run's `qformer` settings (the architecture) agree with it."""
    from qformer.checkpoint import CheckpointError, read_model_dir
    from qformer.stage1 import Stage1Model

    try:
        config, state_dict = read_model_dir(directory)
    except (CheckpointError, FileNotFoundError) as e:
        raise ConfigError(f"`init_from`: {e}") from None
    if config.get("kind") != Stage1Model.KIND:
        raise ConfigError(f"`init_from`: {directory} is a {config.get('kind', 'unknown')!r} checkpoint, not a stage-1 one.")
    if not (Path(directory) / "tokenizer").is_dir():
        raise ConfigError(f"`init_from`: {directory} has no tokenizer/ folder (a stage-1 run saves one beside its weights).")
    trained = config["qformer"].get("vision_width")
    if trained != width:
        raise ConfigError(
            f"`init_from`: {directory} was trained on vision tokens of width {trained}, but this run's "
            f"{source} gives {width}: use the tower it was trained with ({config.get('vision')})."
        )
    differ = [f"{k}: {v!r} here, {config['qformer'].get(k)!r} in the checkpoint" for k, v in qformer.items()
              if config["qformer"].get(k) != v]  # fmt: skip
    if differ:
        raise ConfigError(
            f"`init_from`: the architecture is {directory}'s, and `qformer` sets it otherwise:\n  - "
            + "\n  - ".join(differ) + "\nDrop these from `qformer` (or set `qformer={}`)."
        )
    return config, state_dict


def _check_pairs(rows: list[int], source: str) -> None:
    """`batch_in_pairs` pairs training rows 2k and 2k + 1: they must be records 2r and 2r + 1 of the
    file, each with one caption (several captions per record, or a left-out record, would pair
    strangers)."""
    if len(rows) % 2:
        raise ConfigError(f"`batch_in_pairs`: {source} gives {len(rows)} training captions; pairs need an even number.")
    for k in range(0, len(rows), 2):
        if rows[k] % 2 or rows[k + 1] != rows[k] + 1:
            raise ConfigError(
                f"`batch_in_pairs`: training captions {k} and {k + 1} of {source} come from records {rows[k]} and "
                f"{rows[k + 1]}, not one pair (2r, 2r + 1). It needs records in pairs (2k, 2k + 1) with "
                "one caption each, as `generate_world(twins=True)` writes; or set `batch_in_pairs: false`."
            )


def main(argv: list[str] | None = None) -> int:
    return common.main(Stage1Settings, Stage1Recipe, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
