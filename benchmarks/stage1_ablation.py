"""The BLIP-2 ablation as a curve: stage 2 from the stage-1 Q-Former vs from a fresh one, at several
stage-2 budgets.

BLIP-2 (Fig. 5) shows that generative learning without representation learning lags behind at the
same number of stage-2 steps. `qformer demo` measures one point of that curve, at its own stage-2
budget; this script measures several. It reuses a finished demo directory (its world, feature
cache, stage-1 checkpoint, cached backbones and world BERT) and, for each budget, trains both arms
with the demo's own stage-2 settings (`qformer.demo.DemoSettings`: same data, seed, batch order and
learning-rate schedule for that budget), side by side on one thread each, then scores both on the
held-out test images (captions and VQA) and on the compositional split (captions).

    python benchmarks/stage1_ablation.py --demo runs/demo [--steps 150 300 700] [--captions-only]
        [--seeds 0 1 2 3] [--eval-at 150]

`--seeds`: the comparison repeated, paired, over seeds. For each seed, stage 1 is trained again
with that seed (the demo's own stage-1 checkpoint serves its own seed) and both arms of stage 2
train with it too (the fresh layers' initialisation and the batch order), so each seed is one
demo's worth of variation after the backbones. The summary gives, per budget, each arm's mean and
spread and the paired difference (stage 1 minus fresh) with the number of seeds where stage 1
is ahead: one seed's difference is inside the run-to-run spread, a sign over several is not.

`--eval-at`: also score each arm's checkpoint at these steps of the same run (BLIP-2's Fig. 5
reads one run per arm at several iterations; `--steps` trains a separate, fully annealed run per
budget). Rows carry `at` (the step scored) beside `steps` (the run's budget).

`--captions-only` is BLIP-2's own protocol for Fig. 5: stage 2 on captions alone and VQA zero-shot
(the LM answers from its pre-training on the world's text), where the demo's stage 2 also trains on
question-answer pairs.

Measured on this project's 2-core CPU: 27 s to train the pair at 150 steps, 46 s at 300,
plus the evaluation of both (captions and VQA on 500 test images, captions on 200 compositional). Writes DEMO/ablation_curve.json (DEMO/ablation_curve_captions_only.json). Nothing here asserts a number: it prints them.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", required=True, help="a finished `qformer demo --out` directory")
    parser.add_argument("--steps", type=int, nargs="+", default=[150, 300, 700], help="stage-2 budgets")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="repeat over these seeds, stage 1 retrained for each (default: the demo's seed, its stage 1)")
    parser.add_argument("--eval-at", type=int, nargs="+", default=[],
                        help="also score each run's checkpoints at these steps (below its budget)")
    parser.add_argument("--keep", action="store_true", help="keep the trained checkpoints")
    parser.add_argument("--captions-only", action="store_true",
                        help="BLIP-2's Fig. 5 protocol: both arms train stage 2 on the captions alone, so VQA is "
                             "zero-shot (the demo's own stage 2 also trains on question-answer pairs)")  # fmt: skip
    args = parser.parse_args()
    for n in args.eval_at:
        if not 0 < n < max(args.steps):
            parser.error(f"--eval-at {n}: a step between 0 and the largest --steps budget ({max(args.steps)})")

    from qformer import evaluate
    from qformer.demo import DemoPlan, DemoSettings, train_stage2
    from qformer.side_job import SideJob, worth_it
    from qformer.world.backbones import ensure_backbones
    from recipes.common import run as run_recipe
    from recipes.stage1 import Stage1Recipe

    demo = Path(args.demo)
    metrics = json.loads((demo / "metrics.json").read_text())
    plan = DemoPlan(**metrics["plan"])
    seed = metrics.get("seed", 0)
    backbones = ensure_backbones(metrics["world"], seed=seed, llm=metrics["llm"], num_queries=plan.num_queries)
    stage1_config = json.loads((demo / "stage1" / "model" / "config.json").read_text())
    # the fresh arm starts where the demo's stage 1 started: the world BERT, or (older demos) a random trunk
    bert = stage1_config.get("qformer", stage1_config).get("meta", {}).get("bert")
    if bert and not Path(bert).is_dir():  # the cache moved or was cleared: this machine's world BERT
        bert = backbones["bert_dir"]
    settings = DemoSettings(demo, plan, seed=seed, llm_dir=backbones["llm_dir"], vision=stage1_config["vision"],
                            bert=bert, tokenizer_dir=None if bert else demo / "qformer_tokenizer",
                            stage2_data=demo / "data" / ("train.json" if args.captions_only else "train_stage2.json"))  # fmt: skip
    name = "ablation_curve_captions_only" if args.captions_only else "ablation_curve"
    if args.seeds:
        name += "_seeds"
    work = demo / name
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for run_seed in args.seeds or [seed]:
        seeded = DemoSettings(demo, plan, seed=run_seed, llm_dir=settings.llm_dir, vision=settings.vision,
                              bert=settings.bert, tokenizer_dir=settings.tokenizer_dir,
                              stage2_data=settings.stage2_data)  # fmt: skip
        stage1 = demo / "stage1" / "model"
        stage1_seconds = 0.0
        if run_seed != seed:  # this seed's own stage 1, on the demo's features and settings
            start = time.perf_counter()
            run_recipe(Stage1Recipe(seeded.stage1(work / f"stage1_seed{run_seed}", plan.stage1_steps)))
            stage1_seconds = time.perf_counter() - start
            stage1 = work / f"stage1_seed{run_seed}" / "model"
        for steps in args.steps:
            tag = f"{steps}" if args.seeds is None else f"{steps}_seed{run_seed}"
            arms = {"with stage 1": work / f"with_{tag}", "without stage 1": work / f"without_{tag}"}
            start = time.perf_counter()
            points = sorted({n for n in args.eval_at if n < steps} | {steps})
            every = math.gcd(*points)  # a checkpoint at every scored step, all of them kept
            saves = {"save_every": every, "keep_checkpoints": steps // every + 1}
            fresh = replace(seeded.stage2(arms["without stage 1"], None, steps), **saves)
            from_stage1 = replace(seeded.stage2(arms["with stage 1"], str(stage1), steps), **saves)
            if worth_it():
                with SideJob(train_stage2, fresh, log=work / f"without_{tag}.log"):
                    train_stage2(from_stage1)
            else:
                train_stage2(from_stage1)
                train_stage2(fresh)
            seconds = time.perf_counter() - start
            for arm, directory in arms.items():
                for at in points:
                    model = directory / "model" if at == steps else directory / "checkpoints" / f"step-{at:07d}" / "model"
                    cap = evaluate.evaluate_captions(model, demo / "data" / "test.json", num_beams=plan.num_beams)
                    vqa = evaluate.evaluate_vqa(model, demo / "data" / "test.json", num_beams=plan.vqa_beams)
                    comp = evaluate.evaluate_captions(model, demo / "data" / "compositional_test.json", num_beams=plan.num_beams)
                    row = {"steps": steps, "at": at, "arm": arm, "seed": run_seed, "cider": cap["cider"],
                           "all_right": cap["exact_match"], "vqa": vqa["accuracy"],
                           "compositional_all_right": comp["exact_match"], "vqa_zero_shot": args.captions_only,
                           "train_seconds_pair": round(seconds, 1), "stage1_seconds": round(stage1_seconds, 1)}  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                if not args.keep:
                    shutil.rmtree(directory, ignore_errors=True)
            (demo / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
        if not args.keep and run_seed != seed:
            shutil.rmtree(work / f"stage1_seed{run_seed}", ignore_errors=True)

    print(f"\n{'stage-2 steps':>13}  {'at':>5}  {'seed':>4}  {'arm':<16} {'CIDEr':>6} {'all right':>9} {'VQA':>6} "
          f"{'comp. right':>11}")  # fmt: skip
    for r in rows:
        print(f"{r['steps']:>13}  {r['at']:>5}  {r['seed']:>4}  {r['arm']:<16} {r['cider']:6.3f} {r['all_right']:9.3f} "
              f"{r['vqa']:6.3f} {r['compositional_all_right']:11.3f}")  # fmt: skip
    if args.seeds and len(args.seeds) > 1:
        print_paired_summary(rows)


METRICS = ("cider", "all_right", "vqa", "compositional_all_right")


def paired_summary(rows: list[dict]) -> list[dict]:
    """Per stage-2 budget, step scored (`at`, the budget when absent) and metric: each arm's mean
    and standard deviation over seeds, and the paired difference (stage 1 minus fresh): its mean,
    its standard deviation and in how many of the seeds stage 1 is ahead, level or behind."""
    from statistics import mean, stdev

    def sd(xs: list[float]) -> float:
        return stdev(xs) if len(xs) > 1 else 0.0

    out = []
    for steps, at in sorted({(r["steps"], r.get("at", r["steps"])) for r in rows}):
        by_seed: dict[int, dict[str, dict]] = {}
        for r in rows:
            if (r["steps"], r.get("at", r["steps"])) == (steps, at):
                by_seed.setdefault(r["seed"], {})[r["arm"]] = r
        pairs = [(v["with stage 1"], v["without stage 1"]) for v in by_seed.values() if len(v) == 2]
        for metric in METRICS:
            w = [a[metric] for a, _ in pairs]
            f = [b[metric] for _, b in pairs]
            d = [x - y for x, y in zip(w, f)]
            out.append({"steps": steps, "at": at, "metric": metric, "seeds": len(pairs), "with_mean": mean(w), "with_sd": sd(w),
                        "without_mean": mean(f), "without_sd": sd(f), "diff_mean": mean(d), "diff_sd": sd(d),
                        "ahead": sum(x > 0 for x in d), "level": sum(x == 0 for x in d),
                        "behind": sum(x < 0 for x in d)})  # fmt: skip
    return out


def print_paired_summary(rows: list[dict]) -> None:
    print(f"\n{'steps':>5}  {'at':>5}  {'metric':<24} {'seeds':>5}  {'with stage 1':>15}  {'without':>15}  "
          f"{'difference':>16}  ahead/level/behind")  # fmt: skip
    for s in paired_summary(rows):
        print(f"{s['steps']:>5}  {s['at']:>5}  {s['metric']:<24} {s['seeds']:>5}  {s['with_mean']:7.3f} +- {s['with_sd']:5.3f}  "
              f"{s['without_mean']:7.3f} +- {s['without_sd']:5.3f}  {s['diff_mean']:+7.3f} +- {s['diff_sd']:5.3f}  "
              f"{s['ahead']}/{s['level']}/{s['behind']}")  # fmt: skip


if __name__ == "__main__":
    main()
