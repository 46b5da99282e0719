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

`--captions-only` is BLIP-2's own protocol for Fig. 5: stage 2 on captions alone and VQA zero-shot
(the LM answers from its pre-training on the world's text), where the demo's stage 2 also trains on
question-answer pairs.

Measured on this project's 2-core CPU: 27 s to train the pair at 150 steps, 46 s at 300,
plus the evaluation of both (captions and VQA on 500 test images, captions on 200 compositional). Writes DEMO/ablation_curve.json (DEMO/ablation_curve_captions_only.json). Nothing here asserts a number: it prints them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", required=True, help="a finished `qformer demo --out` directory")
    parser.add_argument("--steps", type=int, nargs="+", default=[150, 300, 700], help="stage-2 budgets")
    parser.add_argument("--keep", action="store_true", help="keep the trained checkpoints")
    parser.add_argument("--captions-only", action="store_true",
                        help="BLIP-2's Fig. 5 protocol: both arms train stage 2 on the captions alone, so VQA is "
                             "zero-shot (the demo's own stage 2 also trains on question-answer pairs)")  # fmt: skip
    args = parser.parse_args()

    from qformer import evaluate
    from qformer.demo import DemoPlan, DemoSettings, train_stage2
    from qformer.side_job import SideJob, worth_it
    from qformer.world.backbones import ensure_backbones

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
    work = demo / name
    rows = []
    for steps in args.steps:
        arms = {"with stage 1": work / f"with_{steps}", "without stage 1": work / f"without_{steps}"}
        start = time.perf_counter()
        fresh = settings.stage2(arms["without stage 1"], None, steps)
        if worth_it():
            with SideJob(train_stage2, fresh, log=work / f"without_{steps}.log"):
                train_stage2(settings.stage2(arms["with stage 1"], str(demo / "stage1" / "model"), steps))
        else:
            train_stage2(settings.stage2(arms["with stage 1"], str(demo / "stage1" / "model"), steps))
            train_stage2(fresh)
        seconds = time.perf_counter() - start
        for arm, directory in arms.items():
            model = directory / "model"
            cap = evaluate.evaluate_captions(model, demo / "data" / "test.json", num_beams=plan.num_beams)
            vqa = evaluate.evaluate_vqa(model, demo / "data" / "test.json", num_beams=plan.vqa_beams)
            comp = evaluate.evaluate_captions(model, demo / "data" / "compositional_test.json", num_beams=plan.num_beams)
            row = {"steps": steps, "arm": arm, "cider": cap["cider"], "all_right": cap["exact_match"],
                   "vqa": vqa["accuracy"], "compositional_all_right": comp["exact_match"],
                   "vqa_zero_shot": args.captions_only, "train_seconds_pair": round(seconds, 1)}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
            if not args.keep:
                shutil.rmtree(directory, ignore_errors=True)
        (demo / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")

    print(f"\n{'stage-2 steps':>13}  {'arm':<16} {'CIDEr':>6} {'all right':>9} {'VQA':>6} {'comp. right':>11}")
    for r in rows:
        print(f"{r['steps']:>13}  {r['arm']:<16} {r['cider']:6.3f} {r['all_right']:9.3f} {r['vqa']:6.3f} "
              f"{r['compositional_all_right']:11.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
