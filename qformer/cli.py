"""The `qformer` command.

Subcommands land with the parts they drive; each one's `--help` says what it does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _vision_spec(value: str) -> dict:
    """`--vision`: a JSON mapping, or a YAML / JSON file holding one (a recipe config: its `vision`)."""
    from recipes.config import read_yaml

    if value.lstrip().startswith("{"):
        try:
            spec = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"--vision {value!r} is not valid JSON ({e}).") from None
    else:
        spec = read_yaml(value)
        spec = spec.get("vision", spec)
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(
            f"--vision {value!r}: expected a mapping like {{\"source\": \"open_clip\", \"name\": ..., "
            "\"pretrained\": ..., \"layer\": -2}, or a config file with such a `vision:` section."
        )
    return spec


def _import(args: argparse.Namespace) -> int:
    from qformer import convert
    from qformer.config import QFormerConfig

    out = Path(args.out)
    for flag, value in (("--tokenizer", args.tokenizer), ("--vision", args.vision)):
        if value and args.source_format != "lavis":
            raise ValueError(f"{flag} is for --from lavis; a transformers directory brings its own.")
    if args.source_format == "lavis":
        state_dict = convert.load_lavis_checkpoint(args.src)
        # LAVIS files hold no config: the preset gives the trunk, the tensors give the rest
        shapes = {}
        if "ln_vision.weight" in state_dict:
            shapes["vision_width"] = state_dict["ln_vision.weight"].shape[0]
        if "query_tokens" in state_dict:
            shapes["num_query_tokens"] = state_dict["query_tokens"].shape[1]
        config = QFormerConfig.from_name(args.preset, **shapes)
        model, report = convert.stage1_from_lavis(state_dict, config)
        tokenizer = None
        if args.tokenizer:  # LAVIS files hold no tokenizer: the one named here is checked and saved
            from qformer.bert_init import check_tokenizer_fits, load_tokenizer

            tokenizer = load_tokenizer(args.tokenizer)
            check_tokenizer_fits(tokenizer, config, args.tokenizer)
        vision = None
        if args.vision:  # nor a tower: the one named here is built once, to check what it feeds ln_vision
            from bridges.vision import VisionBridge

            vision = _vision_spec(args.vision)
            bridge = VisionBridge.from_spec(vision)
            if bridge.width != config.vision_width:
                raise ValueError(
                    f"--vision {vision['name']!r} gives tokens {bridge.width} wide, but the file's ln_vision reads "
                    f"{config.vision_width}: name the tower it was trained with (BLIP-2's EVA ViT-g: 1408, layer -2)."
                )
        model.save_pretrained(out, extra={"vision": vision} if vision else None)
        if tokenizer is not None:
            tokenizer.save_pretrained(out / "tokenizer")
        kind = "stage-1"
    else:
        from qformer.hf_blip2 import import_hf_blip2

        # Blip2ForConditionalGeneration -> stage 2, Blip2ForImageTextRetrieval -> stage 1
        kind, report = import_hf_blip2(args.src, out)
    print(report.summary())
    print(f"wrote a {kind} checkpoint to {out}")
    return 0


RECIPES = {
    "stage1": "recipes.stage1",
    "stage2": "recipes.stage2",
    "blip_pretrain": "recipes.blip",
    "blip_caption": "recipes.blip",
    "blip_retrieval": "recipes.blip",
}


def _recipe_module(config_path: str):
    import importlib

    from recipes.config import ConfigError, read_yaml

    name = read_yaml(config_path).get("recipe")
    if name not in RECIPES:
        raise ConfigError(f"{config_path}: `recipe` is {name!r}; set it to one of {sorted(RECIPES)}.")
    return importlib.import_module(RECIPES[name])


def _train(args: argparse.Namespace) -> int:
    return _recipe_module(args.config).main([args.config, *args.overrides])


def _cache_features(args: argparse.Namespace) -> int:
    from bridges.vision import VisionBridge
    from qformer.data import load_pairs
    from qformer.feature_cache import write_feature_cache
    from recipes.config import ConfigError, load_config

    module = _recipe_module(args.config)
    settings_cls = next(v for k, v in vars(module).items() if k.endswith("Settings"))
    s = load_config(settings_cls, args.config, args.overrides)
    if s.recipe.startswith("blip_"):
        raise ConfigError(f"{args.config}: BLIP trains its ViT, so there are no frozen tokens to cache; train from pixels.")
    if not s.feature_cache:
        raise ConfigError("Set `feature_cache=DIR` (where the tokens go; training then reads them from there).")
    spec = s.vision
    if not spec and getattr(s, "stage1", None):
        from qformer.checkpoint import read_model_dir

        spec = read_model_dir(s.stage1)[0].get("vision")
    if not spec:
        raise ConfigError("Set `vision` (the frozen tower whose tokens are cached).")
    bridge = VisionBridge.from_spec(spec, device=args.device)
    pairs = load_pairs(s.train_data, image_root=s.image_root)
    out = write_feature_cache(bridge, pairs, s.feature_cache, batch_size=args.batch_size, on_bad_sample=s.on_bad_sample)
    print(f"cached the tokens of {pairs.num_rows} pairs' images in {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from qformer import evaluate

    if args.task == "retrieval":
        result = evaluate.evaluate_retrieval(args.checkpoint, args.data, k_test=args.k_test, fusion=args.fusion)
        summary = {k: result[k] for k in ("itc", "itm")}
    elif args.task == "caption":
        result = evaluate.evaluate_captions(args.checkpoint, args.data, num_beams=args.num_beams)
        summary = {k: v for k, v in result.items() if k != "samples"}
    else:
        result = evaluate.evaluate_vqa(args.checkpoint, args.data, num_beams=args.num_beams)
        summary = {k: v for k, v in result.items() if k != "samples"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


def _images(paths: list[str], bridge):
    from qformer.evaluate import image_pixels

    return image_pixels(bridge, [Path(p) for p in paths])


def _caption(args: argparse.Namespace) -> int:
    from qformer.evaluate import load_stage2

    model = load_stage2(args.checkpoint)
    captions = model.generate(
        pixel_values=_images(args.images, model.vision), num_beams=args.num_beams, max_new_tokens=args.max_new_tokens
    )
    for path, caption in zip(args.images, captions):
        print(f"{path}\t{caption}")
    return 0


def _ask(args: argparse.Namespace) -> int:
    from qformer.evaluate import load_stage2

    model = load_stage2(args.checkpoint)
    print(model.answer([args.question], pixel_values=_images([args.image], model.vision), num_beams=args.num_beams)[0])
    return 0


def _demo(args: argparse.Namespace) -> int:
    from qformer.demo import run_demo

    run_demo(
        args.out, llm=args.llm, world=args.world, recipe=args.recipe, minutes=args.minutes, seed=args.seed, fast=args.fast
    )
    report = f" and {args.out}/report.html" if args.recipe == "blip2" else ""
    print(f"\nwrote {args.out}/metrics.json{report}")
    return 0


def _capfilt(args: argparse.Namespace) -> int:
    from qformer.capfilt import run_capfilt

    run_capfilt(
        captioner=args.captioner, filter=args.filter, data=args.data, out=args.out, threshold=args.threshold,
        num_captions=args.num_captions, top_p=args.top_p, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, seed=args.seed, device=args.device,
    )  # fmt: skip
    return 0


def _export(args: argparse.Namespace) -> int:
    if args.format == "hf-blip2":
        from qformer.hf_blip2 import export_hf_blip2

        out = export_hf_blip2(args.checkpoint, args.out)
        print(
            f"wrote a transformers BLIP-2 model to {out} (load it with Blip2ForConditionalGeneration and "
            "Blip2Processor .from_pretrained; decode with generation_config=model.generation_config)"
        )
        return 0
    from qformer.export import export_soft_prompt

    out = export_soft_prompt(args.checkpoint, args.out)
    print(f"wrote the soft visual prompt artifact to {out} (load it with qformer.SoftVisualPrompt.from_pretrained)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qformer",
        description="Train BLIP-2 style Q-Former adapters between a frozen vision tower and a frozen LLM.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        help="BLIP-2 end to end on the built-in ShapesWorld, on a CPU, in minutes",
        description=(
            "Build ShapesWorld, train (or load from the cache) its tiny frozen ViT and LLM, run "
            "stage 1 and stage 2 on the cached tower tokens (the simple world also fine-tunes stage 1 "
            "as the retrieval re-ranker, into DIR/retrieval), evaluate retrieval, captioning and "
            "VQA on held-out and compositional splits, run the ablation without stage 1, and "
            "write DIR/metrics.json and DIR/report.html. --recipe blip: BLIP pre-training (trained "
            "ViT, ITC/ITM/LM) on the same world, retrieval and captioning scores, and the ablation "
            "with encoder and decoder unshared. --recipe capfilt: 40% of the training captions "
            "replaced by mismatched ones; pre-train on them, fine-tune a captioner and a filter, "
            "run CapFilt, pre-train again on the cleaned set, compare retrieval; the filter's "
            "precision and recall at removing the injected captions."
        ),
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--llm", choices=["opt", "t5"], default="opt", help="the frozen LLM's family (default opt)")
    p.add_argument("--world", choices=["simple", "full"], default="simple", help="one object, or 1-3 with relations")
    p.add_argument(
        "--recipe", choices=["blip2", "blip", "capfilt"], default="blip2",
        help="blip2 (default): the two-stage Q-Former; blip: the BLIP baseline; capfilt: BLIP's data bootstrapping",
    )  # fmt: skip
    p.add_argument("--minutes", type=float, default=None, help="the whole run in about this many minutes, backbones included: "
                   "each backbone trains for at most its share of them, and the stages' steps are scaled from a few "
                   "timed steps of each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="a seconds-long smoke run (tiny budgets; numbers meaningless)")
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "train",
        help="run the training recipe a YAML config names (stage1, stage2, blip_pretrain, blip_caption, blip_retrieval)",
        description=(
            "Run the recipe named by the config's `recipe:` key. Settings come from the YAML file; "
            "key=value arguments override them (values parsed as YAML; dict settings take "
            "dotted keys, e.g. vision.layer=-2). Several processes: launch with `accelerate "
            "launch [--multi_gpu --num_processes N ...] -m qformer train CONFIG`."
        ),
    )
    p.add_argument("config", help="recipe YAML, e.g. recipes/configs/blip2_stage1_eva_vitg.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="setting overrides")
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "cache-features",
        help="run the frozen vision tower once over a dataset and store its tokens",
        description=(
            "Compute the frozen tower's tokens for every image of `train_data` (eval transform, no "
            "augmentation) and write them to `feature_cache` as fp16 safetensors shards. A recipe "
            "with `feature_cache` set then trains from them without running the tower. Resumable: "
            "complete shards are kept."
        ),
    )
    p.add_argument("config", help="the recipe YAML whose `train_data`, `vision` and `feature_cache` to use")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="setting overrides")
    p.add_argument("--batch-size", type=int, default=32, help="images per tower forward (default 32)")
    p.add_argument("--device", default=None, help="e.g. cuda:0 (default: cpu)")
    p.set_defaults(func=_cache_features)

    p = sub.add_parser(
        "capfilt",
        help="BLIP's CapFilt: caption every image, keep the captions a filter's ITM accepts",
        description=(
            "For every image of --data (a JSON list or JSONL of {image, caption (string or list)} "
            "records), sample --num-captions synthetic captions from the captioner (a blip_caption "
            "checkpoint) with nucleus sampling, score the original and synthetic captions with the "
            "filter's ITM head (a blip_retrieval checkpoint), and keep those whose match probability "
            "is at least --threshold. Writes --out in the input's format (caption lists, with "
            "`itm_scores`, `caption_source` and the `removed` captions), a summary beside it "
            "(clean.json -> clean.summary.json), and its progress (clean.json.progress.jsonl), from which a "
            "rerun continues where an interrupted one stopped. Unreadable images are skipped, counted and "
            "listed."
        ),
    )
    p.add_argument("--captioner", required=True, help="a BLIP checkpoint with a decoder (recipe blip_caption)")
    p.add_argument("--filter", required=True, help="a BLIP checkpoint with an ITM head (recipe blip_retrieval)")
    p.add_argument("--data", required=True, help="the (web) image-text records to clean, JSON list or JSONL")
    p.add_argument("--out", required=True, help="the cleaned dataset (JSON or JSONL, as the input)")
    p.add_argument("--threshold", type=float, default=0.5, help="keep captions with ITM match probability >= this (0.5)")
    p.add_argument("--num-captions", type=int, default=1, help="synthetic captions sampled per image (default 1)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=20, help="longest synthetic caption in tokens (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the nucleus sampling")
    p.add_argument("--device", default=None, help="e.g. cuda:0 (default: cpu)")
    p.set_defaults(func=_capfilt)

    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint: retrieval (stage 1 or BLIP), caption (stage 2 or BLIP) or vqa (stage 2)",
        description=(
            "Score a checkpoint on a JSON list of {image, caption (string or list of references), "
            "[scene_key], [qa]} records: retrieval recall@1/5/10 both ways by ITC and after ITM "
            "re-ranking of the top k (stage-1 or BLIP checkpoint); BLEU-4 and CIDEr of generated captions "
            "(stage-2 or BLIP checkpoint); VQAv2 accuracy of zero-shot answers (stage-2 checkpoint). Writes "
            "every number to --out."
        ),
    )
    p.add_argument("--checkpoint", required=True, help="a model directory written by a recipe")
    p.add_argument("--task", required=True, choices=["retrieval", "caption", "vqa"])
    p.add_argument("--data", required=True, help="evaluation records (JSON list or JSONL)")
    p.add_argument("--out", required=True, help="where to write the results (JSON)")
    p.add_argument("--k-test", type=int, default=128, help="retrieval: candidates re-ranked by ITM (default 128)")
    p.add_argument(
        "--fusion", choices=("logit", "lavis"), default="logit",
        help="retrieval: a candidate's final score is ITM's match logit plus ITC's logit (cosine / the "
        "learned temperature; default) or plus the bare cosine, as LAVIS scores (to compare with published numbers)",
    )
    p.add_argument("--num-beams", type=int, default=5, help="caption/vqa: beam size (default 5)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("caption", help="caption image files with a stage-2 checkpoint")
    p.add_argument("--checkpoint", required=True, help="a stage-2 model directory")
    p.add_argument("--num-beams", type=int, default=5, help="beam size (default 5; 1 is greedy)")
    p.add_argument("--max-new-tokens", type=int, default=30, help="longest caption in tokens (default 30)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any size or mode)")
    p.set_defaults(func=_caption)

    p = sub.add_parser("ask", help="answer a question about an image (zero-shot VQA prompt)")
    p.add_argument("--checkpoint", required=True, help="a stage-2 model directory")
    p.add_argument("--num-beams", type=int, default=5, help="beam size (default 5)")
    p.add_argument("image", help="an image file")
    p.add_argument("question", help='e.g. "what colour is the circle?"')
    p.set_defaults(func=_ask)

    p = sub.add_parser(
        "export",
        help="export a stage-2 checkpoint: a soft visual prompt for an unmodified LLM, or transformers BLIP-2",
        description=(
            "soft-prompt (default): write safetensors weights (ln_vision, the Q-Former's query path, "
            "the projection) and a JSON manifest (vision tower and layer, LLM, number of queries, "
            "widths, image transform, end-of-text token). qformer.SoftVisualPrompt.from_pretrained(OUT) "
            "turns images into inputs_embeds and attention_mask for the LLM's own generate(). "
            "hf-blip2: write a directory that transformers' Blip2ForConditionalGeneration and "
            "Blip2Processor load (vision tower up to the layer the Q-Former reads, Q-Former, "
            "projection, LLM, tokenizer with the image placeholder, image processor, decoding "
            "defaults). Needs an open_clip ViT without ln_pre or a transformers Blip2VisionModel; any "
            "other tower fails naming what transformers cannot express."
        ),
    )
    p.add_argument("--checkpoint", required=True, help="a stage-2 model directory")
    p.add_argument("--format", choices=["soft-prompt", "hf-blip2"], default="soft-prompt")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_export)

    p = sub.add_parser(
        "import",
        help="convert a LAVIS or transformers BLIP-2 checkpoint into a stage-1 or stage-2 checkpoint",
        description=(
            "Read the Q-Former, its heads and ln_vision from a LAVIS file (.pth, loaded with "
            "weights_only=True, or .safetensors) or from a directory that "
            "transformers.Blip2ForImageTextRetrieval.from_pretrained loads, and write our stage-1 "
            "checkpoint (config.json + model.safetensors). A transformers "
            "Blip2ForConditionalGeneration directory (e.g. from `qformer export --format hf-blip2`) "
            "becomes a stage-2 checkpoint instead, with its LLM and vision tower saved in "
            "OUT/language_model and OUT/vision_model. Keys are matched strictly: anything "
            "unknown, missing or of the wrong shape stops the import and is named."
        ),
    )
    p.add_argument("--from", dest="source_format", choices=["lavis", "hf-blip2"], required=True)
    p.add_argument("src", help="LAVIS checkpoint file, or transformers model directory / hub name")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--preset", default="blip2", help="architecture of a LAVIS file (default: blip2)")
    p.add_argument("--tokenizer", help="with --from lavis: the BERT tokenizer the file was trained with "
                   "(e.g. bert-base-uncased; [DEC] is added), saved as OUT/tokenizer so that init_from= takes OUT")
    p.add_argument("--vision", help="with --from lavis: the frozen tower the file was trained with, as a JSON "
                   "mapping ({\"source\": \"open_clip\", \"name\": ..., \"pretrained\": ..., \"layer\": -2}) or a config "
                   "file with a `vision:` section; checked against ln_vision and written to OUT/config.json, so that "
                   "`qformer eval --task retrieval` (with --tokenizer) takes OUT")
    p.set_defaults(func=_import)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:  # our errors already say what to change
        print(f"qformer {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
