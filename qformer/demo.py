"""`qformer demo`: BLIP-2 end to end on ShapesWorld, on a CPU, in minutes.

From nothing to a trained two-stage model with the same code paths a real EVA ViT-g and OPT-2.7B
take: build the world, train (or load from the cache) its tiny frozen backbones, cache the tower's
tokens, run the stage-1 and stage-2 recipes (and, for retrieval, a stage-1 fine-tune as the
re-ranker, as BLIP-2 fine-tunes stage 1 for retrieval), evaluate retrieval, captioning and VQA on held-out
images (and on a compositional split: attribute pairs never seen in training), run the BLIP-2
ablation (stage 2 without stage 1), and write `metrics.json` and `report.html`.

    qformer demo --out runs/demo [--llm opt|t5] [--world simple|full] [--minutes N]
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch


# The world's LMs were pre-trained on "<scene words> . caption : ..." and "<scene words> . question
# : ... answer : ...", laid out as stage 2 lays out a soft prompt and these prompts (for OPT a BOS
# after the scene words): the soft visual prompt takes the place of the scene words.
CAPTION_PROMPT = ". caption :"
VQA_TEMPLATE = ". question : {} answer :"


@dataclass
class DemoPlan:
    """How much of everything: the only knobs the demo has. `scaled` stretches every training
    budget (`--minutes` sets the factor from the time left after the backbones and a few timed
    steps of each stage)."""

    n_train: int = 5000
    n_test: int = 500
    n_compositional: int = 200
    # 625 steps: with the width-scaled init below ITM leaves its plateau by ~step 200. 550 steps
    # gave a 531-s first run whose ITM missed 0.90 text->image (0.904 / 0.882); 625 gave runs of
    # 533 s (ITM 0.906 / 0.903) and 732 s on a slower machine (0.934 / 0.962; every phase,
    # the backbones included, about 1.4x slower); 700 took 622 s. See docs/demo_history.md.
    stage1_steps: int = 625
    # 48, not 64: a fifth less work on the demo's critical path for the same ITM (stage 1 alone on
    # one ViT's cached features: ITC 0.942 / 0.965, ITM 0.938 / 0.963 at 48; 0.948 / 0.974 and
    # 0.936 / 0.963 at 64). 32 x 1000 steps cost more and gave 0.926 / 0.956, 0.924 / 0.957;
    # 64 x 500 left ITM at 0.912 / 0.899. The full world keeps 64.
    stage1_batch_size: int = 48
    # measured on two ViTs (see docs/demo_history.md): stage 1 at 1e-3 leaves stage 2 a better
    # start than at 2e-3 (700 steps; captions all right 0.896 / 0.880 against 0.872 / 0.818 after
    # stage 2)
    stage1_lr: float = 1e-3
    stage2_steps: int = 400
    batch_size: int = 64
    num_queries: int = 8
    # retrieval: candidates re-ranked by ITM. 8, not 16: on two demo runs' re-rankers ITM R@1 was
    # the same or 0.002 higher (0.942 / 0.959 against 0.940 / 0.959; 0.926 / 0.933 against 0.924 /
    # 0.931) in 60% of the time, which the demo waits for at its end
    k_test: int = 8
    # retrieval is read from stage 1 fine-tuned this many steps (0: from stage 1 itself), as BLIP-2
    # fine-tunes its stage 1 for retrieval; stage 2 still starts from stage 1. The fine-tune trains
    # the re-ranker: ITM at this weight, ITG at 1, ITC off. Stage 1 alone reaches ITC 0.952 / 0.975
    # but its ITM trails (0.916 / 0.936); weighing ITM 4x in stage 1 itself closed that gap but
    # cost stage 2 its start (captions all right 0.814 against 0.906); a fine-tune with ITC kept on
    # (weights 1, 0.5, 0.25) left ITM 0.02 behind on a validation world. docs/demo_history.md
    retrieval_steps: int = 150
    retrieval_lr: float = 5e-4
    retrieval_itm_weight: float = 4.0
    qa_per_image: int = 2  # stage 2 also learns to answer: this many question-answer records per image
    num_beams: int = 5  # captions
    # answers are one or two words: greedy gave the same VQA accuracy as 5 beams on both arms of a
    # demo run (0.931 and 0.948 either way, 1000 test questions) in a third of the time or less
    vqa_beams: int = 1
    # the tower block the Q-Former reads: the last of the ShapesWorld ViT's four (measured with 800
    # stage-1 steps: ITC R@1 0.948 / 0.972 and captions 0.876 from the last block, 0.936 / 0.956
    # and 0.834 from the penultimate one, which BLIP-2 reads of its 40-block EVA ViT-g)
    vision_layer: int = -1

    def scaled(self, factor: float) -> DemoPlan:
        """The plan with stage 1's, stage 2's and the retrieval fine-tune's steps times `factor`,
        each at least 10 (or its own count, if fewer)."""

        def times(steps: int) -> int:
            return max(min(steps, 10), int(steps * factor))

        return DemoPlan(**{**self.__dict__, "stage1_steps": times(self.stage1_steps),
                           "stage2_steps": times(self.stage2_steps), "retrieval_steps": times(self.retrieval_steps)})  # fmt: skip


def default_plan(world: Literal["simple", "full"], fast: bool = False) -> DemoPlan:
    if fast:
        return FAST
    if world == "full":
        # far more scenes (1 to 3 objects, relations): twice the training images. Stage 2 gets
        # twice stage 1's steps (the `--minutes` calibration scales both): from run 11's stage 1
        # (1485 steps), 2850 stage-2 steps wrote 0.372 of captions all right where 950 wrote 0.300,
        # while stage 1's ITC was 0.976 / 0.965 after 853 steps (run 10). Retrieval is read from
        # stage 1 itself: the simple world's re-ranker fine-tune, from run 12's stage 1 (789
        # steps), lifted ITM-reranked R@1 by 0.004 / 0.010 (to 0.944 / 0.928) for 101 s
        return DemoPlan(n_train=10000, stage1_steps=500, stage1_batch_size=64, stage2_steps=1000, retrieval_steps=0)
    return DemoPlan()


@dataclass(frozen=True)
class BackboneTimes:
    """Seconds that a first run (empty cache) spent on its backbones on the project's 2-core CPU, one
    thread each, side by side, and on the whole run: `--minutes` gives each backbone the same share
    of its own time (`backbone_budgets`)."""

    total_s: float
    vit_s: float  # the ViT's training loop
    lm_s: float  # the LM's, beside it
    bert_s: float  # the BERT's, after the LM


BACKBONE_TIMES = {
    # the default plan (ViT 1800 steps, LM 1500, BERT 300), estimated from runs AA and A (December
    # 2026); run AC, a fresh clone at the machine's usual speed, measured 272, 198 and 80 s in 589
    "simple": BackboneTimes(total_s=596.0, vit_s=270.0, lm_s=200.0, bert_s=80.0),
    # run 12 (`--minutes 30`): ViT 3000 steps 622 s, LM 1500 steps 389 s, BERT 400 steps 218 s
    "full": BackboneTimes(total_s=1611.0, vit_s=622.0, lm_s=389.0, bert_s=218.0),
}


def backbone_budgets(world: str, seconds: float) -> dict[str, float]:
    """Training seconds for the ViT, the LM and the BERT in a run of `seconds`: their shares of a
    reference run (`BACKBONE_TIMES`). A machine as fast as the reference never reaches them when
    `seconds` is at least the reference's total; a slower one trains fewer steps."""
    t = BACKBONE_TIMES[world]
    share = seconds / t.total_s
    return {"vit": t.vit_s * share, "lm": t.lm_s * share, "bert": t.bert_s * share}


FAST = DemoPlan(n_train=128, n_test=16, n_compositional=8, stage1_steps=4, stage1_batch_size=16, stage2_steps=4,
                batch_size=16, k_test=4, num_beams=1, retrieval_steps=2)  # fmt: skip


def cpu_model(cpuinfo: str) -> str | None:
    """The CPU's model from the text of Linux's /proc/cpuinfo ("model name" on x86, "Model" or
    "Hardware" on ARM boards); None where it names none."""
    for field in ("model name", "Model", "Hardware"):
        for line in cpuinfo.splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == field and value.strip():
                return value.strip()
    return None


def describe_machine() -> dict[str, Any]:
    """What a run's seconds were measured on, for metrics.json: the CPU's model, the cores this
    process may use, the instruction set ATen dispatches its CPU kernels to (AVX2, AVX512, ...),
    torch's threads and version, and the GPU if there is one. The project's 2-core machines have
    changed under it between sessions (Intel with AVX2, AMD EPYC with AVX-512), and the demo's
    wall time with them (README, "The simple world"): timings compare only beside this."""
    try:
        cpu = cpu_model(Path("/proc/cpuinfo").read_text())
    except OSError:
        cpu = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    machine: dict[str, Any] = {
        "cpu": cpu or platform.processor() or platform.machine() or "unknown",
        "cores": cores,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name()
    return machine


def machine_row(machine: dict[str, Any]) -> str:
    """One line of `describe_machine()` for the demos' printed tables."""
    text = f"{machine['cpu']}, {machine['cores']} cores ({machine['cpu_capability']}), torch {machine['torch']}"
    return text + (f", {machine['gpu']}" if "gpu" in machine else "")


class Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def phase(self, name: str):
        clock = self

        class _Phase:
            def __enter__(self):
                print(f"\n== {name}", flush=True)
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                clock.seconds[name] = round(time.perf_counter() - self.start, 1)
                print(f"== {name}: {clock.seconds[name]:.1f} s", flush=True)
                return False

        return _Phase()


def world_tokenizer_for_qformer(data_dir: Path, out_dir: Path) -> Path:
    """A BERT-style word-level tokenizer over the words of the world in `data_dir` and of the
    demo's prompts, saved to `out_dir` (for recipes whose Q-Former starts without a BERT)."""
    from qformer.world.backbones import bert_word_tokenizer

    texts = [CAPTION_PROMPT, VQA_TEMPLATE.format("")]  # what an instruction-aware Q-Former reads
    for split in ("train", "test", "compositional_test"):
        texts += _world_texts(data_dir, split)
    out_dir.mkdir(parents=True, exist_ok=True)
    bert_word_tokenizer(texts).save_pretrained(out_dir)
    return out_dir


def _world_texts(data_dir: Path, split: str) -> list[str]:
    path = data_dir / f"{split}.json"
    if not path.is_file():
        return []
    texts = []
    for record in json.loads(path.read_text()):
        captions = record["caption"] if isinstance(record["caption"], list) else [record["caption"]]
        texts += captions + [f"{qa['question']} {qa['answer']}" for qa in record.get("qa", [])]
    return texts


def check_tokenizer_covers(tokenizer_dir: str | Path, data_dir: Path) -> None:
    """Raise if the Q-Former's tokenizer (the world BERT's) maps a word of the demo's world to
    [UNK]: the Q-Former would silently read those words as one unknown token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    texts = [CAPTION_PROMPT, VQA_TEMPLATE.format("")]
    for split in ("train", "test", "compositional_test"):
        texts += _world_texts(data_dir, split)
    split = tok.backend_tokenizer.pre_tokenizer
    words = {w for text in texts for w, _ in split.pre_tokenize_str(text.lower())}
    unknown = sorted(w for w in words if tok.convert_tokens_to_ids(w) == tok.unk_token_id)
    if unknown:
        raise ValueError(
            f"The Q-Former tokenizer in {tokenizer_dir} has no token for {unknown[:10]} (words of the world in "
            f"{data_dir}); delete that cached BERT folder so that it is trained again with this world's words."
        )


def write_caption_and_vqa_mixture(train: Path, out: Path, qa_per_image: int, *, seed: int) -> Path:
    """Stage 2's training file: every caption record of `train`, plus `qa_per_image` of each
    image's question-answer pairs as {"image", "image_id", "question", "answer"} records (drawn
    at random for a seed), so that stage 2 learns to caption and to answer, as BLIP-2's VQA
    fine-tuning does; with 0 it is the captions alone and VQA is zero-shot."""
    import random

    records = json.loads(train.read_text())
    rng = random.Random(f"{seed}/qa-mixture")
    questions = [
        {"image": r["image"], "image_id": r["image_id"], "question": qa["question"], "answer": qa["answer"]}
        for r in records for qa in rng.sample(r.get("qa", []), min(qa_per_image, len(r.get("qa", []))))
    ]  # fmt: skip
    out.write_text(json.dumps(records + questions) + "\n")
    return out


class DemoSettings:
    """The stage-1 and stage-2 recipe settings of a demo run in `out`: its tiny Q-Former, and the
    optimisation both stages share (used by `run_demo` and `benchmarks/stage1_ablation.py`).
    `bert`: the world BERT the Q-Former starts from, in both arms of the ablation (BLIP-2 starts
    both from bert-base); its tokenizer is then the Q-Former's. None: a random trunk of the same
    shape, with the tokenizer in `tokenizer_dir`."""

    TRUNK = dict(hidden_size=128, num_heads=4, intermediate_size=256, num_layers=4, max_position_embeddings=64)
    INIT_STD = 0.05

    def __init__(self, out: Path, plan: DemoPlan, *, seed: int, llm_dir: str, vision: dict[str, Any],
                 tokenizer_dir: Path | None = None, stage2_data: Path, bert: str | None = None) -> None:  # fmt: skip
        if bert is None and tokenizer_dir is None:
            raise ValueError("DemoSettings needs `bert` or `tokenizer_dir`")
        self.out, self.plan, self.seed, self.bert = Path(out), plan, seed, bert
        self.llm_dir, self.vision, self.stage2_data = llm_dir, vision, stage2_data
        self.tokenizer_dir = Path(bert) if bert is not None else tokenizer_dir
        # with a BERT, the trunk's shape is read from its checkpoint. INIT_STD: the fresh layers
        # (cross-attention, queries, heads) start at bert-base's 0.02 scaled to this width,
        # 0.02 * sqrt(768 / 128) ~ 0.05: a matrix's output grows with sqrt(fan-in), so at 0.02 a
        # 128-wide cross-attention starts about 8x weaker against the residual stream than
        # BLIP-2's (0.05 against 0.42 for tokens that move together); the query outputs then
        # vary across images by 0.2% of their variance, and ITM sat longer on its plateau
        self.qformer = dict(num_query_tokens=plan.num_queries, cross_attention_freq=1, embed_dim=64,
                            hidden_dropout=0.0, attention_dropout=0.0, initializer_range=self.INIT_STD,
                            **({} if bert else self.TRUNK))  # fmt: skip

    def common(self, steps: int) -> dict[str, Any]:
        return dict(
            feature_cache=str(self.out / "features"), batch_size=self.plan.batch_size, mixed_precision="no",
            log_every=max(1, min(25, steps // 4)), seed=self.seed, weight_decay=0.05, max_steps=steps,
            save_every=steps, warmup_steps=max(1, steps // 20), warmup_lr=1e-5, min_lr=1e-4,
            tokenizer=str(self.tokenizer_dir), qformer_preset="tiny", vision=self.vision,
        )  # fmt: skip

    def stage1(self, output_dir: Path, steps: int):
        from recipes.stage1 import Stage1Settings

        settings = {**self.common(steps), "batch_size": self.plan.stage1_batch_size}
        return Stage1Settings(output_dir=str(output_dir), train_data=str(self.out / "data" / "train.json"),
                              bert=self.bert, qformer=self.qformer, lr=self.plan.stage1_lr, **settings)  # fmt: skip

    def retrieval(self, output_dir: Path, stage1: str, steps: int):
        """The retrieval fine-tune: `steps` more steps from the stage-1 checkpoint `stage1` (see
        `DemoPlan.retrieval_steps`)."""
        from recipes.stage1 import Stage1Settings

        lr = self.plan.retrieval_lr
        settings = {**self.common(steps), "batch_size": self.plan.stage1_batch_size, "lr": lr, "min_lr": lr / 10}
        return Stage1Settings(output_dir=str(output_dir), train_data=str(self.out / "data" / "train.json"), bert=None,
                              init_from=stage1, loss_weights={"itc": 0.0, "itm": self.plan.retrieval_itm_weight},
                              **settings)  # fmt: skip

    def stage2(self, output_dir: Path, stage1: str | None, steps: int):
        """Stage 2 from the stage-1 checkpoint `stage1`, or from a fresh Q-Former (the world BERT
        where there is one) when it is None."""
        from recipes.stage2 import Stage2Settings

        return Stage2Settings(
            output_dir=str(output_dir), train_data=str(self.stage2_data), llm=self.llm_dir, stage1=stage1,
            bert=self.bert if stage1 is None else None, qformer=self.qformer if stage1 is None else {}, lr=2e-3,
            prompt=CAPTION_PROMPT, vqa_template=VQA_TEMPLATE, **self.common(steps),
        )  # fmt: skip


def run_demo(
    out: str | Path,
    *,
    llm: Literal["opt", "t5"] = "opt",
    world: Literal["simple", "full"] = "simple",
    recipe: Literal["blip2", "blip", "capfilt"] = "blip2",
    minutes: float | None = None,
    seed: int = 0,
    plan: DemoPlan | None = None,
    cache_dir: str | Path | None = None,
    fast: bool = False,
) -> dict[str, Any]:
    """`minutes`: about this many minutes in all. The backbones then train for at most their
    share of it (`backbone_budgets`) and the stages' steps are scaled, up or down, from a few timed
    steps of each (`minutes_scale`). Without it, `plan` (default: `default_plan(world, fast)`) in full."""
    if recipe in ("blip", "capfilt"):  # the BLIP baseline and its CapFilt bootstrapping: qformer/demo_blip.py
        from qformer import demo_blip

        run = demo_blip.run_blip_demo if recipe == "blip" else demo_blip.run_capfilt_demo
        return run(out, world=world, minutes=minutes, seed=seed, cache_dir=cache_dir, fast=fast)
    from qformer.world.backbones import ensure_backbones
    from qformer.world.shapes import generate_world
    from recipes.stage1 import Stage1Recipe
    from recipes.stage2 import Stage2Recipe
    from recipes.common import run as run_recipe

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan or default_plan(world, fast)
    clock = Clock()
    started = time.perf_counter()
    torch.manual_seed(seed)

    # step 1: the world: train / test / compositional_test splits written as JSON + PNG
    with clock.phase("data"):
        data = out / "data"
        if not (data / "world.json").is_file():
            generate_world(data, level=world, n_train=plan.n_train, n_test=plan.n_test,
                           n_compositional=plan.n_compositional, image_size=64, seed=seed)  # fmt: skip
        stage2_data = write_caption_and_vqa_mixture(data / "train.json", data / "train_stage2.json",
                                                    plan.qa_per_image, seed=seed)  # fmt: skip

    from qformer.side_job import SideJob, worth_it

    side_by_side = worth_it(default=not fast)
    # step 2: the frozen backbones, trained on the world once and cached; side by side, the LM and
    # the BERT train beside the ViT, one thread each (simple world, fresh cache, 2000-step ViT:
    # 596 s in all this way; about 618 s estimated with the LM beside stage 1, where the LM and
    # the ablation outlast stage 1's 48-wide batches; docs/demo_history.md, runs O to Q)
    budgets = backbone_budgets(world, minutes * 60) if minutes is not None else None
    with clock.phase("backbones"):
        backbones = ensure_backbones(world, cache_dir=cache_dir, seed=seed, llm=llm, fast=fast,
                                     num_queries=plan.num_queries, time_budgets=budgets)  # fmt: skip
    # the tower's config file as its name: checkpoints then load it in any process
    vision = {"source": "open_clip", "name": backbones["vit_config"], "pretrained": backbones["vit_weights"], "layer": plan.vision_layer}

    # step 3: run the tower once over the training images (eval transform, fp16 on disk)
    with clock.phase("feature cache"):
        from bridges.vision import VisionBridge
        from qformer.data import load_pairs
        from qformer.feature_cache import write_feature_cache

        bridge = VisionBridge.from_spec(vision)
        write_feature_cache(bridge, load_pairs(data / "train.json"), out / "features", batch_size=256)

    # the Q-Former starts from the world BERT and reads with its tokenizer
    check_tokenizer_covers(backbones["bert_dir"], data)
    settings = DemoSettings(out, plan, seed=seed, llm_dir=backbones["llm_dir"], vision=vision,
                            bert=backbones["bert_dir"], stage2_data=stage2_data)  # fmt: skip

    # `--minutes`: time a few steps of each stage on this machine, then give stage 1, stage 2 and
    # the ablation as many steps (in the default plan's proportions) as the time left allows, less
    # a share kept for evaluation
    calibration: dict[str, Any] = {}
    if minutes is not None:
        calibration["backbone_budgets_s"] = {k: round(v, 1) for k, v in budgets.items()}
        with clock.phase("calibration"):
            probe = out / "calibration"
            s1, s2 = settings.stage1(probe / "s1", CALIBRATION_STEPS), settings.stage2(probe / "s2", None, CALIBRATION_STEPS)
            calibration["stage1_s_per_step"] = _seconds_per_step(Stage1Recipe(s1))
            calibration["stage2_s_per_step"] = _seconds_per_step(Stage2Recipe(s2))
            shutil.rmtree(probe, ignore_errors=True)
        left = minutes * 60 - (time.perf_counter() - started)
        calibration["scale"] = round(minutes_scale(left, plan, calibration["stage1_s_per_step"],
                                                   calibration["stage2_s_per_step"], side_by_side), 3)  # fmt: skip
        plan = plan.scaled(calibration["scale"])
        settings.plan = plan
        print(f"--minutes {minutes}: {left:.0f} s left, steps scaled x{calibration['scale']:.2f} "
              f"(stage 1 {plan.stage1_steps}, stage 2 {plan.stage2_steps})", flush=True)  # fmt: skip

    # step 4: stage 1 (ITC + ITM + ITG) on the cached tokens, and beside it (it needs no stage 1)
    # the ablation: stage 2 from a fresh Q-Former, with the budget of step 5
    ablation_settings = settings.stage2(out / "stage2_without_stage1", None, plan.stage2_steps)
    test = data / "test.json"
    stage1_recipe = Stage1Recipe(settings.stage1(out / "stage1", plan.stage1_steps))
    if side_by_side:
        log = out / "stage2_without_stage1.log"
        print(f"(the ablation, stage 2 without stage 1, trains beside stage 1 in a second process; log: {log})")
        with clock.phase("stage 1"), SideJob(ablation_arm, ablation_settings, test, plan.num_beams, plan.vqa_beams, log=log) as side:
            _on_every_step(stage1_recipe, side.share)
            run_recipe(stage1_recipe)
        ablation = side.result()
        clock.seconds["ablation: stage 2 without stage 1, and its evaluation (beside stage 1)"] = ablation["seconds"]
    else:
        with clock.phase("stage 1"):
            run_recipe(stage1_recipe)
        with clock.phase("ablation: stage 2 without stage 1, and its evaluation"):
            ablation = ablation_arm(ablation_settings, test, plan.num_beams, plan.vqa_beams)

    # step 5: stage 2 from the stage-1 Q-Former, then the evaluation of its captions and answers;
    # beside both, the retrieval fine-tune and its evaluation (they read the stage-1 checkpoint only)
    from qformer import evaluate
    from qformer.world.backbones import evaluate_world_lm

    test_sets = {"test": test, "compositional": data / "compositional_test.json"}
    stage1_model, stage2_model = out / "stage1" / "model", out / "stage2" / "model"
    stage2_recipe = Stage2Recipe(settings.stage2(out / "stage2", str(stage1_model), plan.stage2_steps))
    tune = settings.retrieval(out / "retrieval", str(stage1_model), plan.retrieval_steps) if plan.retrieval_steps else None
    what = "retrieval fine-tune and evaluation" if tune else "retrieval evaluation"
    comp = test_sets["compositional"]
    with_comp = comp.is_file() and bool(json.loads(comp.read_text()))

    def evaluate_stage2(share: Callable[[], None]) -> dict[str, Any]:
        """Captions and answers of stage 2; `share()` before each takes the threads back once the
        side job beside it is done."""
        with clock.phase("evaluation"):
            share()
            found = {"caption": evaluate.evaluate_captions(stage2_model, test, num_beams=plan.num_beams)}
            share()
            found["vqa"] = evaluate.evaluate_vqa(stage2_model, test, num_beams=plan.vqa_beams)
            # the frozen LM's own ceiling: its greedy captions and answers given the TRUE scene
            # words in place of the soft prompt; the gap to the above is what the Q-Former leaves out
            share()
            found["ceiling"] = evaluate_world_lm(backbones["llm_dir"], world, num_queries=plan.num_queries,
                                                 n=16 if fast else 200)  # fmt: skip
            if with_comp:
                share()
                found["c_cap"] = evaluate.evaluate_captions(stage2_model, comp, num_beams=plan.num_beams)
                share()
                found["c_vqa"] = evaluate.evaluate_vqa(stage2_model, comp, num_beams=plan.vqa_beams)
        return found

    if side_by_side:
        with SideJob(tuned_retrieval_scores, tune, stage1_model, test_sets, plan.k_test, log=out / "retrieval.log") as side:
            with clock.phase("stage 2"):
                _on_every_step(stage2_recipe, side.share)
                run_recipe(stage2_recipe)
            found = evaluate_stage2(side.share)
            with clock.phase(f"waiting for the {what}"):
                retrieval_by_set = side.result()
        clock.seconds[f"{what} (beside stage 2 and the evaluation)"] = retrieval_by_set.pop("seconds")
    else:
        with clock.phase("stage 2"):
            run_recipe(stage2_recipe)
        with clock.phase(what):
            retrieval_by_set = tuned_retrieval_scores(tune, stage1_model, test_sets, plan.k_test)
            retrieval_by_set.pop("seconds")
        found = evaluate_stage2(lambda: None)
    retrieval_model = Path(retrieval_by_set.pop("checkpoint"))

    # step 6: the metrics, on held-out images and on the compositional split
    metrics: dict[str, Any] = {"world": world, "llm": llm, "seed": seed, "plan": plan.__dict__,
                               "machine": describe_machine()}  # fmt: skip
    if calibration:
        metrics["calibration"] = calibration
    retrieval, caption, vqa = retrieval_by_set["test"], found["caption"], found["vqa"]
    metrics["retrieval"] = {k: retrieval[k] for k in ("itc", "itm", "instance", "hit")}
    metrics["retrieval"]["checkpoint"] = str(retrieval_model.relative_to(out))
    metrics["caption"] = {k: caption[k] for k in ("bleu4", "cider", "exact_match", "exact_match_by_objects")}
    metrics["vqa"] = {k: vqa[k] for k in ("accuracy", "by_type")}
    metrics["ablation"] = {"without_stage1": {"caption": ablation["caption"], "vqa": ablation["vqa"]}}
    metrics["llm_from_true_scene"] = {k: found["ceiling"][k] for k in ("caption_all_correct", "vqa_accuracy")}
    if with_comp:
        metrics["compositional"] = {
            "retrieval": {k: retrieval_by_set["compositional"][k] for k in ("itc", "itm")},
            "caption": {k: found["c_cap"][k] for k in ("bleu4", "cider", "exact_match")},
            "vqa": {"accuracy": found["c_vqa"]["accuracy"]},
        }
    metrics["seconds"] = {**clock.seconds, "total": round(time.perf_counter() - started, 1)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    with clock.phase("report"):
        _write_report(out, metrics, caption, vqa, stage2_model, data, plan)
    metrics["seconds"] = {**clock.seconds, "total": round(time.perf_counter() - started, 1)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print_table(metrics)
    return metrics


# `--minutes`: steps each stage trains to time its steps (the first two not counted). Was 6, the
# mean of four: runs 16, 17 and 18 then timed a full-world stage-1 step at 0.49, 0.59 and 0.71 s
# (0.48 on the idle machine, median of 14), and run 18 ended at 24.9 of its 30 minutes
CALIBRATION_STEPS = 12

# `--minutes`: the share of the time left after the backbones kept for evaluation and the report,
# at least 60 s. Was 15%: the full world kept ~149 s and its evaluation took 28 to 30 s (runs 17 to
# 19, which ended at 24.9 to 27.6 of their 30 minutes); the simple world's takes about 16 s. The
# evaluation's time does not grow with the training's, so the floor is what usually decides
EVALUATION_SHARE = 0.05


# Two one-thread processes side by side each run this much slower than one process on both cores
# would, which is how the calibration times its steps (measured on 2 cores: a ViT step 0.113 s on
# one thread vs 0.082 s on two; a 450-step stage 1 160 s beside another vs 113 s alone). Was 1.4;
# three full-world runs (14 to 16, `--minutes 30`) fit 1.6, 1.8 and 2.1 to their stage 1 beside
# the ablation, and run 16 took 31.6 minutes (stage 1 699 s for a calibrated 444 s alone).
SIDE_BY_SIDE_SLOWDOWN = 1.8


def minutes_scale(left: float, plan: DemoPlan, stage1_s_per_step: float, stage2_s_per_step: float,
                  side_by_side: bool = False) -> float:  # fmt: skip
    """The factor on `plan`'s steps that fits stage 1, stage 2 and the ablation (as many steps as
    stage 2) into `left` seconds less the evaluation's share; at least 0.1. `side_by_side`: the
    ablation trains beside stage 1, both slower by SIDE_BY_SIDE_SLOWDOWN while they overlap."""
    training = left - max(60.0, EVALUATION_SHARE * left)
    stage1 = plan.stage1_steps * stage1_s_per_step
    stage2 = plan.stage2_steps * stage2_s_per_step
    if side_by_side:  # together until the shorter one ends, then the longer one alone at full speed
        both = max(stage1, stage2) + (SIDE_BY_SIDE_SLOWDOWN - 1) * min(stage1, stage2)
    else:
        both = stage1 + stage2
    return max(0.1, training / (both + stage2))


def train_stage2(settings: Any) -> float:
    """Run the stage-2 recipe with `settings`; its seconds (module-level: a SideJob runs it)."""
    from recipes.common import run
    from recipes.stage2 import Stage2Recipe

    start = time.perf_counter()
    run(Stage2Recipe(settings))
    return time.perf_counter() - start


def tuned_retrieval_scores(tune: Any, stage1_model: Path, test_sets: dict[str, Path], k_test: int) -> dict[str, Any]:
    """The retrieval fine-tune with the stage-1 settings `tune` (None: none), then `retrieval_scores`
    of its checkpoint, or of `stage1_model` (module-level: a SideJob runs it beside stage 2 and
    the evaluation of captions and answers).
    Returns {name: scores, ..., "checkpoint", "seconds"} (the seconds of both)."""
    from recipes.common import run
    from recipes.stage1 import Stage1Recipe

    start = time.perf_counter()
    model = stage1_model
    if tune is not None:
        run(Stage1Recipe(tune))
        model = Path(tune.output_dir) / "model"
    out = retrieval_scores(model, test_sets, k_test)
    out["checkpoint"] = str(model)
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def retrieval_scores(stage1_model: Path, test_sets: dict[str, Path], k_test: int) -> dict[str, Any]:
    """`evaluate_retrieval` of the stage-1 checkpoint on each non-empty test set (module-level: a
    SideJob runs it, in `tuned_retrieval_scores`). Returns {name: scores, ..., "seconds"}."""
    from qformer import evaluate

    start = time.perf_counter()
    out: dict[str, Any] = {}
    for name, path in test_sets.items():
        if path.is_file() and json.loads(path.read_text()):
            out[name] = evaluate.evaluate_retrieval(stage1_model, path, k_test=k_test)
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def ablation_arm(settings: Any, test: Path, num_beams: int, vqa_beams: int) -> dict[str, Any]:
    """The BLIP-2 ablation's arm: stage 2 with `settings` (from a fresh Q-Former), then its
    captions and answers on `test` scored as stage 2's are. Module-level, so that a SideJob runs it
    beside stage 1: its evaluation then costs the demo little time of its own (about 20 s on one
    thread while stage 1 has the other). Returns {"seconds", "caption", "vqa"}."""
    from qformer import evaluate

    start = time.perf_counter()
    train_stage2(settings)
    model = Path(settings.output_dir) / "model"
    caption = evaluate.evaluate_captions(model, test, num_beams=num_beams)
    vqa = evaluate.evaluate_vqa(model, test, num_beams=vqa_beams)
    return {"seconds": round(time.perf_counter() - start, 1),
            "caption": {k: caption[k] for k in ("bleu4", "cider", "exact_match")},
            "vqa": {k: vqa[k] for k in ("accuracy", "by_type")}}  # fmt: skip


def _on_every_step(recipe, fn) -> None:
    """Call `fn()` after every optimizer step of `recipe` (once it is set up)."""
    setup = recipe.setup

    def setup_then_wrap():
        setup()
        optimizer_step = recipe.optimizer.step

        def step(*args, **kwargs):
            out = optimizer_step(*args, **kwargs)
            fn()
            return out

        recipe.optimizer.step = step

    recipe.setup = setup_then_wrap


def _seconds_per_step(recipe, warmup: int = 2) -> float:
    """Train `recipe` (a few steps) and return its seconds per step after the first `warmup`
    (`per_step`)."""
    from recipes.common import run

    marks: list[float] = []
    _on_every_step(recipe, lambda: marks.append(time.perf_counter()))
    run(recipe)
    return per_step(marks, warmup)


def per_step(marks: Sequence[float], warmup: int = 2) -> float:
    """The median time between consecutive `marks` (the clock at the end of each step) after the
    first `warmup` steps. The median, not the mean: one slow step among a few (this CPU has them,
    0.46 to 0.72 s for a full-world stage-1 step) otherwise moves the whole `--minutes` plan."""
    if len(marks) <= warmup:
        raise RuntimeError(f"calibration ran {len(marks)} steps, need more than {warmup}")
    return statistics.median(b - a for a, b in zip(marks[warmup - 1 :], marks[warmup:]))


def _write_report(out: Path, metrics, caption, vqa, stage2_model: Path, data: Path, plan: DemoPlan) -> None:
    from qformer import evaluate
    from qformer.report import attention_maps, render_report
    from qformer.world.shapes import Scene, all_correct
    from recipes.common import read_metrics

    records, root = evaluate.read_records(data / "test.json")
    by_image = {r["image"]: r for r in records}
    captions = [
        {"image": str(root / s["image"]), "caption": s["caption"], "references": evaluate.references(by_image[s["image"]]),
         "correct": all_correct(s["caption"], Scene.from_json(by_image[s["image"]]["scene"]))}
        for s in caption["samples"][:24]
    ]  # fmt: skip
    answers = [{**s, "image": str(root / s["image"])} for s in vqa["samples"][:24]]
    retrieval = _retrieval_examples(out / metrics["retrieval"]["checkpoint"], records[:200], root)
    model = evaluate.load_stage2(stage2_model)
    pixels = evaluate.image_pixels(model.vision, [root / r["image"] for r in records[:4]])
    with torch.no_grad():
        tokens = model.ln_vision(model.vision(pixels).float())
    side = int(round((tokens.shape[1] - 1) ** 0.5))
    maps = attention_maps(model.qformer, tokens, grid=(side, side))
    attention = [{"image": str(root / r["image"]), "maps": m} for r, m in zip(records[:4], maps)]
    curves = {name: read_metrics(out / name / "metrics.jsonl") for name in ("stage1", "stage2")}
    render_report(out, metrics=metrics, captions=captions, vqa=answers, retrieval=retrieval, curves=curves,
                  attention=attention, title="qformer demo: BLIP-2 on ShapesWorld")  # fmt: skip


def _retrieval_examples(checkpoint: Path, records: list[dict], root: Path, n: int = 6) -> list[dict]:
    """For a few captions, the five images the stage-1 model ranks first by ITC."""
    from qformer import evaluate

    model, tokenizer, bridge = evaluate.load_stage1(checkpoint)
    with torch.no_grad():
        tokens = bridge(evaluate.image_pixels(bridge, [root / r["image"] for r in records]))
        _, image_feats = model.encode_image(tokens)
        queries = [evaluate.references(r)[0] for r in records[:n]]
        text = tokenizer(queries, padding="longest", return_tensors="pt")
        text_feats = model.text_features(text.input_ids, text.attention_mask)
        scores = model.itc_scores(image_feats, text_feats).T  # (queries, images)
    examples = []
    for q, (query, row) in enumerate(zip(queries, scores)):
        top = row.topk(5).indices.tolist()
        examples.append({
            "query": query,
            "images": [str(root / records[i]["image"]) for i in top],
            "hits": [records[i].get("scene_key") == records[q].get("scene_key") for i in top],
        })  # fmt: skip
    return examples


def print_table(metrics: dict[str, Any]) -> None:
    r = metrics["retrieval"]
    rows = [
        ("retrieval R@1 i2t / t2i (ITC)", f"{r['itc']['i2t_r1']:.3f} / {r['itc']['t2i_r1']:.3f}"),
        ("retrieval R@1 i2t / t2i (ITM re-ranked)", f"{r['itm']['i2t_r1']:.3f} / {r['itm']['t2i_r1']:.3f}"),
        ("captions with every attribute right", f"{metrics['caption']['exact_match']:.3f}"),
    ]
    by_objects = metrics["caption"].get("exact_match_by_objects", {})
    if len(by_objects) > 1:  # the full world: where the captions fail, by objects in the scene
        rows.append((f"  ... of scenes with {' / '.join(by_objects)} objects",
                     " / ".join(f"{v:.3f}" for v in by_objects.values())))  # fmt: skip
    rows += [
        ("caption BLEU-4 / CIDEr", f"{metrics['caption']['bleu4']:.3f} / {metrics['caption']['cider']:.3f}"),
        (f"VQA accuracy ({'trained on QA pairs' if metrics['plan'].get('qa_per_image') else 'zero-shot'})",
         f"{metrics['vqa']['accuracy']:.3f}"),
    ]
    fresh = metrics["ablation"]["without_stage1"]
    if "vqa" in fresh:  # the whole arm, in the rows' order (older metrics files hold its captions only)
        rows.append(("ablation without stage 1: all right / CIDEr / VQA",
                     f"{fresh['caption']['exact_match']:.3f} / {fresh['caption']['cider']:.3f} / {fresh['vqa']['accuracy']:.3f}"))  # fmt: skip
    else:
        rows.append(("ablation: CIDEr without stage 1", f"{fresh['caption']['cider']:.3f}"))
    # one seed: on the simple world stage 1's gain is about one seed-to-seed standard deviation
    # (README, "The stage-1 ablation"), so this row alone can come out level or reversed
    rows.append(("  ... one seed; to compare over several", "python benchmarks/stage1_ablation.py --demo DIR --seeds 0 1 2 3 4"))
    if "llm_from_true_scene" in metrics:  # the frozen LM's ceiling (absent from older metrics files)
        lm = metrics["llm_from_true_scene"]
        rows.append(("frozen LM from the true scene words: captions / VQA",
                     f"{lm['caption_all_correct']:.3f} / {lm['vqa_accuracy']:.3f}"))  # fmt: skip
    if "compositional" in metrics:
        c = metrics["compositional"]
        rows += [
            ("compositional: attributes right", f"{c['caption']['exact_match']:.3f}"),
            ("compositional: VQA accuracy", f"{c['vqa']['accuracy']:.3f}"),
        ]
    if "machine" in metrics:  # absent from older metrics files
        rows.append(("machine", machine_row(metrics["machine"])))
    rows.append(("seconds", ", ".join(f"{k} {v:.0f}" for k, v in metrics["seconds"].items())))
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows))
