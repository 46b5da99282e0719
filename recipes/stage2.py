"""Stage 2 of BLIP-2: generative learning. The Q-Former's query outputs, through one Linear, are
the soft visual prompt of a frozen LLM (decoder-only like OPT, or encoder-decoder like FlanT5).

    qformer train recipes/configs/blip2_stage2_opt2.7b.yaml [key=value ...]

A copy of the stage-1 recipe, edited where stage 2 differs (as torchtune prefers to a shared
trainer): the model, the loss, and what a checkpoint holds (the trainable weights only). With
`llm_lora` / `vision_lora` a LoRA adapter on the frozen LLM / tower trains too (peft); checkpoints
and resumption carry its weights and optimizer state.
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

from bridges.lora import lora_problems
from qformer.optim import adamw
from recipes import common
from recipes.config import ConfigError, differences, to_dict

# settings that may change between a run and its resumption
RESUMABLE_CHANGES = ("output_dir", "resume_from", "max_steps", "save_every", "log_every", "num_workers", "keep_checkpoints")


@dataclass
class Stage2Settings(common.TrainSettings):
    recipe: Literal["stage2"] = "stage2"
    # The frozen LLM: any AutoModelForCausalLM / AutoModelForSeq2SeqLM, hub name or local dir.
    llm: str = "facebook/opt-2.7b"
    llm_dtype: str | None = None  # default per device (bf16 on GPUs, fp32 on CPUs)
    end_of_text: Literal["auto", "eos", "newline"] = "auto"  # auto: "\n" for OPT, EOS otherwise
    # The stage-1 model directory: Q-Former weights and architecture, and its vision tower. null
    # trains stage 2 from a fresh Q-Former (the BLIP-2 ablation "without representation learning").
    stage1: str | None = None
    # The frozen tower (`VisionBridge.from_spec`); empty: the one named by the stage-1 checkpoint.
    vision: dict[str, Any] = field(default_factory=dict)
    # Only without `stage1`: how to build the fresh Q-Former (as the stage-1 recipe does).
    bert: str | None = None
    tokenizer: str | None = None
    qformer_preset: str = "blip2"
    qformer: dict[str, Any] = field(default_factory=dict)
    prompt: str | None = None  # e.g. "a photo of": a text prompt after the soft prompt (no loss on it)
    # how the model asks questions: question-answer records in `train_data` ({"image", "question",
    # "answer"}) train with it; with captions alone, VQA is zero-shot
    vqa_template: str = "Question: {} Short answer:"
    prefix_lm: bool = False  # encoder-decoder LLMs: split captions at random (prefix-LM pretraining)
    max_text_len: int = 32
    warmup_steps: int = 2000
    # LoRA adapters (peft) on the frozen LLM / vision tower; null: none (BLIP-2 as published).
    # {r: 8, alpha: 16, dropout: 0.05, target_modules: null}; target_modules null picks per model:
    # OPT, Llama q_proj, v_proj; T5 q, v; GPT-2 c_attn; open_clip ViT mlp.c_fc, mlp.c_proj;
    # transformers CLIP q_proj, v_proj. The adapted model's own weights stay frozen.
    llm_lora: dict[str, Any] | None = None
    vision_lora: dict[str, Any] | None = None
    # InstructBLIP: the Q-Former also reads each item's text prompt (the caption `prompt`, or the
    # question in `vqa_template`) with its own tokenizer (stage 1's `tokenizer/`, else `bert` /
    # `tokenizer`); queries and prompt tokens share self-attention, only the queries go to the LLM.
    # false: BLIP-2, the query-only Q-Former.
    instruction_aware: bool = False

    def problems(self) -> list[str]:
        p = super().problems()
        for key in ("llm_lora", "vision_lora"):
            if getattr(self, key) is not None:
                p += lora_problems(getattr(self, key), key=key)
        if self.vision_lora is not None and self.feature_cache:
            p.append(
                "`vision_lora` adapts the vision tower, but the tokens in `feature_cache` were computed "
                "without the adapter: unset `feature_cache` to train on images, or unset `vision_lora`"
            )
        if self.stage1 is None and self.bert is None and self.tokenizer is None and not self.qformer:
            p.append("without `stage1`, say how to build the Q-Former: `bert`, or `qformer_preset` with `qformer` fields")
        if self.stage1 is None and self.feature_cache is None and not self.vision:
            p.append("without `stage1`, set `vision` (the frozen tower) or `feature_cache`")
        if self.instruction_aware and self.stage1 is None and self.bert is None and self.tokenizer is None:
            p.append(
                "`instruction_aware` reads prompts with the Q-Former's tokenizer: set `stage1` (whose "
                "tokenizer/ is used), `bert` or `tokenizer`"
            )
        return p


class Stage2Recipe:
    def __init__(self, settings: Stage2Settings) -> None:
        common.check(settings)
        self.s = settings
        self.output_dir = Path(settings.output_dir)

    # ------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from bridges.language import LanguageBridge
        from bridges.vision import VisionBridge
        from qformer.bert_init import config_from_bert, init_from_bert, load_tokenizer
        from qformer.checkpoint import read_model_dir
        from qformer.config import QFormerConfig
        from qformer.data import GlobalBatchSampler, ImageTextDataset, SkipReport, load_pairs
        from qformer.feature_cache import CachedPairsDataset, FeatureCache
        from qformer.stage2 import Stage2Model, stage1_tokenizer

        s = self.s
        probe = Accelerator()  # to learn the device before choosing the precision
        mp = common.mixed_precision_for(s.mixed_precision, probe.device)
        self.acc = acc = Accelerator(mixed_precision=mp) if mp != probe.mixed_precision else probe
        set_seed(s.seed)
        self.log = common.MetricsLog(self.output_dir, enabled=acc.is_main_process)

        # step 1: the Q-Former's architecture and tower: from the stage-1 checkpoint, or fresh
        stage1_config = read_model_dir(s.stage1)[0] if s.stage1 else None
        vision_spec = s.vision or (stage1_config or {}).get("vision")
        if s.feature_cache:
            self.cache = FeatureCache(s.feature_cache)
            self.vision, self.vision_spec, width = None, self.cache.spec, self.cache.width
        else:
            if not vision_spec:
                raise ConfigError(f"{s.stage1} names no vision tower: set `vision` in the config.")
            self.cache = None
            self.vision = VisionBridge.from_spec(vision_spec, device=acc.device)
            self.vision_spec, width = self.vision.spec, self.vision.width
        if stage1_config is not None:
            config = QFormerConfig.from_dict(stage1_config["qformer"])
        elif s.bert:
            config = config_from_bert(s.bert, vision_width=width, **s.qformer)
        else:
            tokenizer = load_tokenizer(s.tokenizer) if s.tokenizer else None
            ids = {} if tokenizer is None else {
                "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                "dec_token_id": tokenizer.bos_token_id,
            }  # fmt: skip
            config = QFormerConfig.from_name(s.qformer_preset, **{"vision_width": width, **ids, **s.qformer})

        # the Q-Former's own tokenizer, for instruction-aware prompts: the one its text embeddings
        # learned with (stage 1's), else the one named for a fresh Q-Former
        qformer_tokenizer = None
        if s.instruction_aware:
            if s.stage1 and (Path(s.stage1) / "tokenizer").is_dir():
                qformer_tokenizer = stage1_tokenizer(s.stage1)
            elif s.bert or s.tokenizer:
                qformer_tokenizer = load_tokenizer(s.bert or s.tokenizer)
            else:
                raise ConfigError(
                    f"`instruction_aware` needs the Q-Former's tokenizer, but {s.stage1} has no tokenizer/ "
                    "folder: set `tokenizer` to the one stage 1 was trained with."
                )

        # step 2: the frozen LLM and the stage-2 model around it
        language = LanguageBridge.from_pretrained(
            s.llm, device=acc.device, compute_dtype=s.llm_dtype, end_of_text=s.end_of_text
        )
        model = Stage2Model(
            config, language=language, vision=self.vision, prompt=s.prompt, vqa_template=s.vqa_template,
            llm_lora=s.llm_lora, vision_lora=s.vision_lora, instruction_aware=s.instruction_aware,
            qformer_tokenizer=qformer_tokenizer,
        )  # fmt: skip
        if s.stage1:
            report = model.load_stage1(s.stage1)
            if acc.is_main_process:
                print(f"stage-1 weights from {s.stage1}: {report.summary().splitlines()[0]}, "
                      f"{len(report.skipped)} stage-1 head tensors unused")  # fmt: skip
        elif s.bert:
            init_from_bert(model.qformer, s.bert)

        # step 3: data: one global batch per step, each process a contiguous slice of it
        # (streaming: read lazily in train(), each process its own share of the file)
        self.dataset = self.sampler = None
        if not s.streaming:
            pairs = load_pairs(s.train_data, image_root=s.image_root)
            if self.cache is not None:
                self.dataset = CachedPairsDataset(pairs, self.cache, on_bad_sample=s.on_bad_sample)
            else:
                self.dataset = ImageTextDataset(pairs, self.vision.train_transform(), on_bad_sample=s.on_bad_sample)
            self.sampler = GlobalBatchSampler(
                len(self.dataset), batch_size=s.batch_size, rank=acc.process_index, world_size=acc.num_processes,
                seed=s.seed,
            )  # fmt: skip
        self.skips = SkipReport()

        # step 4: optimizer over exactly the trainable parameters (Q-Former query path, ln_vision, proj,
        # and the LoRA adapters if any)
        optimizer = adamw(common.param_groups(model, s.weight_decay), lr=s.lr, betas=s.betas, device=acc.device)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.start_step = 0
        resume = common.resolve_resume(s.resume_from, self.output_dir)
        if resume is not None:
            self._resume(resume)

    def _resume(self, directory: Path) -> None:
        meta_settings = common.read_trainer_state(directory)["settings"]
        diffs = differences(meta_settings, to_dict(self.s), ignore=RESUMABLE_CHANGES)
        if diffs:
            raise ConfigError(
                f"Cannot resume from {directory}: it was trained with other settings:\n  - " + "\n  - ".join(diffs)
            )
        model = self.acc.unwrap_model(self.model)
        model.load_trainable_weights(directory / "model")  # the Q-Former side and the LoRA adapters
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
        bar = tqdm(total=s.max_steps, initial=self.start_step, disable=not acc.is_main_process, desc="stage 2")
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
            inputs = {"image_tokens": batch["image_tokens"].to(acc.device)}
        else:
            inputs = {"pixel_values": batch["pixel_values"].to(acc.device)}
        # a caption follows the caption prompt; an answer follows its question in `vqa_template`
        # (an instruction-aware Q-Former reads the same prompts)
        questions = batch.get("question") or [""] * len(batch["caption"])
        prompts = [s.vqa_template.format(q) if q else (s.prompt or "") for q in questions]
        if not any(prompts):
            prompts = None
        with acc.autocast():
            return self.model(
                batch["caption"], **inputs, prompts=prompts, max_length=s.max_text_len, prefix_lm=s.prefix_lm
            )

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
            named_params=model.trainable_state_dict(),
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
        model.save_pretrained(directory, vision_spec=self.vision_spec)

    def cleanup(self) -> None:
        self.log.close()
        if self.acc.is_main_process and self.skips.count:
            print(self.skips.summary())


def main(argv: list[str] | None = None) -> int:
    return common.main(Stage2Settings, Stage2Recipe, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
