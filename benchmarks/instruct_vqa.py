"""VQA accuracy of stage 2 with a plain (BLIP-2) vs an instruction-aware (InstructBLIP) Q-Former.

On the ShapesWorld simple world with the demo's cached frozen backbones (`ensure_backbones`, the
tiny ViT and OPT), the demo's data helpers and Q-Former shape: one stage-1 checkpoint, then two
stage-2 runs from it with the same seed, data order, steps and learning rates on the demo's
caption + question-answer mixture, differing only in `instruction_aware`. Both are scored with
`evaluate_vqa` (the model's `vqa_template`, beam search) on held-out images. `--seeds N` repeats
the pair of stage-2 runs with N seeds (initialisation of the projection, batch order) from the same
stage-1 checkpoint and reports each and the mean.

    OMP_NUM_THREADS=1 python benchmarks/instruct_vqa.py [--steps 500] [--stage1-steps 300] [--seeds 1]

Single-threaded on this project's CPU: about 4 min for stage 1, 2.3 + 3 min per seed for the two
stage-2 runs (the instruction-aware one is slower: the instruction tokens join every layer), 10 s
per evaluation. The world, the feature cache and the stage-1 checkpoint in --out are reused when
present, so a second run with other --steps or --seeds trains stage 2 only. Nothing here asserts a
number: it prints them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

# The demo's Q-Former for this world (see qformer/demo.py): 4 layers of width 128, 8 queries.
QFORMER: dict[str, Any] = {
    "num_query_tokens": 8, "hidden_size": 128, "num_heads": 4, "intermediate_size": 256, "num_layers": 4,
    "cross_attention_freq": 1, "embed_dim": 64, "max_position_embeddings": 64, "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
}  # fmt: skip


def phase(name: str, seconds: dict[str, float]):
    class _Phase:
        def __enter__(self):
            print(f"\n== {name}", flush=True)
            self.start = time.perf_counter()

        def __exit__(self, *exc):
            seconds[name] = round(time.perf_counter() - self.start, 1)
            print(f"== {name}: {seconds[name]:.1f} s", flush=True)
            return False

    return _Phase()


def run(recipe) -> None:
    recipe.setup()
    recipe.train()
    recipe.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/instruct_vqa")
    ap.add_argument("--steps", type=int, default=500, help="stage-2 steps of each run")
    ap.add_argument("--stage1-steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--qa-per-image", type=int, default=2, help="question-answer records per training image")
    ap.add_argument("--num-beams", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="the world, the QA mixture, stage 1, the first stage-2 seed")
    ap.add_argument("--seeds", type=int, default=1, help="stage-2 seeds per variant: --seed, --seed + 1, ...")
    args = ap.parse_args()

    from bridges.vision import VisionBridge
    from qformer.data import load_pairs
    from qformer.demo import CAPTION_PROMPT, VQA_TEMPLATE, world_tokenizer_for_qformer, write_caption_and_vqa_mixture
    from qformer.evaluate import evaluate_vqa
    from qformer.feature_cache import write_feature_cache
    from qformer.world.backbones import ensure_backbones
    from qformer.world.shapes import generate_world
    from recipes.stage1 import Stage1Recipe, Stage1Settings
    from recipes.stage2 import Stage2Recipe, Stage2Settings

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    torch.manual_seed(args.seed)

    with phase("data", seconds):
        data = out / "data"
        if not (data / "world.json").is_file():
            generate_world(data, level="simple", n_train=args.n_train, n_test=args.n_test, n_compositional=0,
                           image_size=64, seed=args.seed)  # fmt: skip
        tokenizer = world_tokenizer_for_qformer(data, out / "qformer_tokenizer")
        mixture = write_caption_and_vqa_mixture(data / "train.json", data / "train_stage2.json", args.qa_per_image,
                                                seed=args.seed)  # fmt: skip
    with phase("backbones (cached)", seconds):
        # the demo's (its default seed): cached after the first demo run, never retrained here
        backbones = ensure_backbones("simple", llm="opt", num_queries=QFORMER["num_query_tokens"], train_bert=False)
    vision = {"source": "open_clip", "name": backbones["vit_config"], "pretrained": backbones["vit_weights"], "layer": -2}
    with phase("feature cache", seconds):
        if not (out / "features" / "index.json").is_file():
            write_feature_cache(VisionBridge.from_spec(vision), load_pairs(data / "train.json"), out / "features",
                                batch_size=256)  # fmt: skip

    common: dict[str, Any] = {
        "feature_cache": str(out / "features"), "batch_size": args.batch_size, "mixed_precision": "no",
        "seed": args.seed, "weight_decay": 0.05, "lr": 2e-3, "min_lr": 1e-4, "warmup_lr": 1e-5,
    }  # fmt: skip
    stage1 = out / "stage1" / "model"
    reused = (stage1 / "model.safetensors").is_file()
    with phase("stage 1", seconds):
        if not reused:
            steps = args.stage1_steps
            run(Stage1Recipe(Stage1Settings(
                output_dir=str(out / "stage1"), train_data=str(data / "train.json"), vision=vision, bert=None,
                tokenizer=str(tokenizer), qformer_preset="tiny", qformer=QFORMER, max_steps=steps, save_every=steps,
                warmup_steps=max(1, steps // 20), log_every=max(1, min(25, steps // 4)),
                **{**common, "lr": 1e-3},
            )))  # fmt: skip
        else:
            print(f"reusing {stage1}")

    names = ("plain", "instruction_aware")
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for seed in range(args.seed, args.seed + args.seeds):
        for name in names:
            run_dir = out / f"stage2_{name}_seed{seed}"
            with phase(f"stage 2, {name}, seed {seed}", seconds):
                run(Stage2Recipe(Stage2Settings(
                    output_dir=str(run_dir), train_data=str(mixture), llm=backbones["llm_dir"], stage1=str(stage1),
                    vision=vision, max_steps=args.steps, save_every=args.steps, warmup_steps=max(1, args.steps // 20),
                    log_every=max(1, min(25, args.steps // 4)), prompt=CAPTION_PROMPT, vqa_template=VQA_TEMPLATE,
                    instruction_aware=name == "instruction_aware", **{**common, "seed": seed},
                )))  # fmt: skip
            with phase(f"VQA, {name}, seed {seed}", seconds):
                results[name].append(evaluate_vqa(run_dir / "model", data / "test.json", num_beams=args.num_beams))

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    types = sorted(results["plain"][0]["by_type"])
    summary: dict[str, Any] = {
        "settings": vars(args),
        "stage1_reused": reused,
        "num_questions": results["plain"][0]["num_questions"],
        "seconds": seconds,
    }
    for name in names:
        summary[name] = {
            "accuracy": [r["accuracy"] for r in results[name]],
            "mean_accuracy": mean([r["accuracy"] for r in results[name]]),
            "mean_by_type": {t: mean([r["by_type"][t] for r in results[name]]) for t in types},
        }
    plain, aware = summary["plain"], summary["instruction_aware"]
    summary["difference"] = aware["mean_accuracy"] - plain["mean_accuracy"]
    (out / "instruct_vqa.json").write_text(json.dumps(summary, indent=2) + "\n")

    rows = [("", "plain", "instruction-aware", "difference")]
    for i, seed in enumerate(range(args.seed, args.seed + args.seeds)):
        a, b = plain["accuracy"][i], aware["accuracy"][i]
        rows.append((f"VQA accuracy, seed {seed}", f"{a:.3f}", f"{b:.3f}", f"{b - a:+.3f}"))
    if args.seeds > 1:
        rows.append(("VQA accuracy, mean", f"{plain['mean_accuracy']:.3f}", f"{aware['mean_accuracy']:.3f}",
                     f"{summary['difference']:+.3f}"))  # fmt: skip
    for t in types:
        a, b = plain["mean_by_type"][t], aware["mean_by_type"][t]
        rows.append((f"  {t}" + (" (mean)" if args.seeds > 1 else ""), f"{a:.3f}", f"{b:.3f}", f"{b - a:+.3f}"))
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    print(f"\nShapesWorld simple, {summary['num_questions']} test questions; stage 2: {args.steps} steps per run "
          f"from one stage-1 checkpoint ({'reused' if reused else f'{args.stage1_steps} steps'})")  # fmt: skip
    for r in rows:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, width))))
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))


if __name__ == "__main__":
    main()
