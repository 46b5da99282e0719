"""`qformer demo --recipe blip` and `--recipe capfilt`: the BLIP baseline on ShapesWorld, on a CPU.

blip: BLIP pre-training (ITC + ITM + LM, the ViT training) on the world the BLIP-2 demo uses (same
seed and splits, so the test images are the same), evaluated with the same code and metrics.json
layout (`retrieval`, `caption`, `compositional`), plus the paper's sharing ablation: encoder and
decoder sharing all but self-attention, against two separate models, after the same budget.

capfilt: the paper's bootstrapping on a world whose training captions are 40% mismatched (the
captions of other scenes; `"noisy": true` marks them). Pre-train on the noisy set; fine-tune a
captioner (LM) and a filter (ITC + ITM) on a small clean set (the paper's COCO); run CapFilt over
the noisy set; pre-train again, same budget, on the cleaned set; compare retrieval. Because we know
which captions were injected, the filter's precision and recall at removing them are measured.

Both start the trained ViT from the ShapesWorld ViT that `ensure_backbones` caches (the original
starts from an ImageNet ViT rather than from scratch), read its last block, and train at the
eval transform: the world's captions name positions, which a flip or a crop would falsify.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from qformer.demo import Clock, describe_machine, machine_row, world_tokenizer_for_qformer


@dataclass
class BlipDemoPlan:
    """How much of everything. `--minutes` stretches the training steps."""

    n_train: int = 5000  # the BLIP-2 demo's world: same seed, so the same images
    n_test: int = 500
    n_compositional: int = 200
    pretrain_steps: int = 300
    batch_size: int = 32
    hidden_size: int = 128  # the MED: width, layers (4 heads, FFN 2x)
    num_layers: int = 4
    lr: float = 1e-3
    k_test: int = 16  # retrieval: candidates re-ranked by ITM
    num_beams: int = 3  # BLIP's caption decoding: 3 beams, 5 to 20 tokens
    # --- capfilt ---
    noise_fraction: float = 0.4  # training captions replaced by the caption of another scene
    n_clean: int = 1000  # the clean (human-annotated) set the captioner and filter fine-tune on
    # a filter fine-tuned for 100 steps keeps half of the injected captions; after 300 it removes
    # nearly all of them
    finetune_steps: int = 300
    num_captions: int = 1  # synthetic captions per image
    threshold: float = 0.5

    def scaled(self, factor: float) -> BlipDemoPlan:
        return replace(
            self,
            pretrain_steps=max(10, int(self.pretrain_steps * factor)),
            finetune_steps=max(5, int(self.finetune_steps * factor)),
        )


FAST = BlipDemoPlan(
    n_train=64, n_test=16, n_compositional=8, pretrain_steps=4, batch_size=16, hidden_size=32, num_layers=2,
    k_test=4, num_beams=1, n_clean=32, finetune_steps=2, threshold=0.0,  # an untrained filter rejects all: keep all
)  # fmt: skip
DEFAULT_SECONDS = {"blip": 420.0, "capfilt": 800.0}  # training + evaluation of the default plans, loaded 2-core CPU


# ------------------------------------------------------------------------------------------
# blip: pre-training and the sharing ablation
# ------------------------------------------------------------------------------------------
def run_blip_demo(
    out: str | Path,
    *,
    world: Literal["simple", "full"] = "simple",
    minutes: float | None = None,
    seed: int = 0,
    plan: BlipDemoPlan | None = None,
    cache_dir: str | Path | None = None,
    fast: bool = False,
) -> dict[str, Any]:
    """BLIP pre-training on ShapesWorld, evaluation, and the sharing ablation; writes and returns
    `out/metrics.json`."""
    from qformer import evaluate
    from qformer.world.shapes import generate_world

    out, clock, started = Path(out), Clock(), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    plan = plan or (FAST if fast else BlipDemoPlan())
    torch.manual_seed(seed)

    with clock.phase("data"):
        data = out / "data"
        if not (data / "world.json").is_file():
            generate_world(data, level=world, n_train=plan.n_train, n_test=plan.n_test,
                           n_compositional=plan.n_compositional, image_size=64, seed=seed)  # fmt: skip
        tokenizer = world_tokenizer_for_qformer(data, out / "tokenizer")
    with clock.phase("backbones"):
        vision = _vision(world, cache_dir=cache_dir, seed=seed, fast=fast)
    plan = _scaled(plan, minutes, started, "blip", fast)

    models = {}
    for name, share in (("shared", True), ("unshared", False)):
        with clock.phase(f"pre-training ({name})"):
            models[name] = _pretrain(out / f"blip_{name}", data / "train.json", plan, vision, tokenizer,
                                     seed=seed, share=share)  # fmt: skip

    metrics: dict[str, Any] = {"recipe": "blip", "world": world, "plan": asdict(plan), "machine": describe_machine()}
    with clock.phase("evaluation"):
        test = data / "test.json"
        sharing = {}
        for name, model_dir in models.items():
            retrieval = evaluate.evaluate_retrieval(model_dir, test, k_test=plan.k_test)
            caption = _captions(model_dir, test, plan)
            sharing[name] = {
                "parameters": parameter_counts(model_dir),
                "retrieval": {k: retrieval[k] for k in ("itc", "itm")},
                "caption": caption,
            }
            if name == "shared":  # the BLIP model: the BLIP-2 demo's layout
                metrics["retrieval"] = {k: retrieval[k] for k in ("itc", "itm", "instance", "hit")}
                metrics["caption"] = caption
        comp = data / "compositional_test.json"
        if comp.is_file() and json.loads(comp.read_text()):
            c_ret = evaluate.evaluate_retrieval(models["shared"], comp, k_test=plan.k_test)
            metrics["compositional"] = {
                "retrieval": {k: c_ret[k] for k in ("itc", "itm")},
                "caption": _captions(models["shared"], comp, plan),
            }
        metrics["sharing"] = sharing
    metrics["seconds"] = {**clock.seconds, "total": round(time.perf_counter() - started, 1)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print_blip_table(metrics)
    return metrics


def parameter_counts(model_dir: Path) -> dict[str, int]:
    """Trainable parameters of a saved BLIP model, each shared tensor once: all, and the text model
    (encoder, decoder, LM head) where sharing saves."""
    from qformer.blip import BlipModel

    model = BlipModel.from_pretrained(model_dir)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    text = ("text_encoder.", "text_decoder.", "lm_head.")
    return {
        "trainable": sum(p.numel() for _, p in trainable),
        "text_model": sum(p.numel() for n, p in trainable if n.startswith(text)),
        "vision": sum(p.numel() for n, p in trainable if n.startswith(("vision.", "vision_norm."))),
    }


def print_blip_table(metrics: dict[str, Any]) -> None:
    def r1(scores: dict[str, Any], by: str = "itm") -> str:
        return f"{scores[by]['i2t_r1']:.3f} / {scores[by]['t2i_r1']:.3f}"

    s = metrics["sharing"]
    rows = [
        ("retrieval R@1 i2t / t2i (ITC)", r1(metrics["retrieval"], "itc")),
        ("retrieval R@1 i2t / t2i (ITM re-ranked)", r1(metrics["retrieval"])),
        ("captions with every attribute right", f"{metrics['caption']['exact_match']:.3f}"),
        ("caption BLEU-4 / CIDEr", f"{metrics['caption']['bleu4']:.3f} / {metrics['caption']['cider']:.3f}"),
    ]  # fmt: skip
    if "compositional" in metrics:
        rows.append(("compositional: attributes right", f"{metrics['compositional']['caption']['exact_match']:.3f}"))
    for name in ("shared", "unshared"):
        p = s[name]["parameters"]
        rows.append((
            f"{name}: params (text model) / R@1 (ITM) / CIDEr",
            f"{p['trainable']:,} ({p['text_model']:,}) / {r1(s[name]['retrieval'])} / {s[name]['caption']['cider']:.3f}",
        ))  # fmt: skip
    _print_rows(rows, metrics["seconds"], metrics.get("machine"))


# ------------------------------------------------------------------------------------------
# capfilt: noisy pre-training, captioner and filter, CapFilt, pre-training on the cleaned set
# ------------------------------------------------------------------------------------------
def run_capfilt_demo(
    out: str | Path,
    *,
    world: Literal["simple", "full"] = "simple",
    minutes: float | None = None,
    seed: int = 0,
    plan: BlipDemoPlan | None = None,
    cache_dir: str | Path | None = None,
    fast: bool = False,
) -> dict[str, Any]:
    """CapFilt end to end on a noisy ShapesWorld; writes and returns `out/metrics.json`."""
    from qformer import evaluate
    from qformer.capfilt import load_progress, run_capfilt
    from qformer.world.shapes import generate_world

    out, clock, started = Path(out), Clock(), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    plan = plan or (FAST if fast else BlipDemoPlan())
    torch.manual_seed(seed)

    # step 1: the "web" set (noisy captions, marked) and a small clean set of other images
    with clock.phase("data"):
        web, clean = out / "data", out / "clean"
        if not (web / "world.json").is_file():
            generate_world(web, level=world, n_train=plan.n_train, n_test=plan.n_test, n_compositional=0,
                           image_size=64, seed=seed, noise_fraction=plan.noise_fraction)  # fmt: skip
        if not (clean / "world.json").is_file():
            generate_world(clean, level=world, n_train=plan.n_clean, n_test=0, n_compositional=0,
                           image_size=64, seed=seed + 1)  # fmt: skip
        tokenizer = world_tokenizer_for_qformer(web, out / "tokenizer")
    with clock.phase("backbones"):
        vision = _vision(world, cache_dir=cache_dir, seed=seed, fast=fast)
    plan = _scaled(plan, minutes, started, "capfilt", fast)

    # step 2: pre-train on the noisy set; captioner and filter from it, fine-tuned on the clean set
    with clock.phase("pre-training (noisy)"):
        noisy_model = _pretrain(out / "blip_noisy", web / "train.json", plan, vision, tokenizer, seed=seed)
    with clock.phase("fine-tuning (captioner, filter)"):
        captioner = _finetune(out / "captioner", "blip_caption", noisy_model, clean / "train.json", plan, seed=seed)
        filt = _finetune(out / "filter", "blip_retrieval", noisy_model, clean / "train.json", plan, seed=seed)

    # step 3: CapFilt over the noisy set
    with clock.phase("capfilt"):
        cleaned = out / "data_capfilt" / "train.json"
        summary = run_capfilt(
            captioner=captioner, filter=filt, data=web / "train.json", out=cleaned, threshold=plan.threshold,
            num_captions=plan.num_captions, batch_size=64, seed=seed, progress=not fast,
        )  # fmt: skip

    if summary["captions_out"] < plan.batch_size:
        raise ValueError(
            f"CapFilt kept {summary['captions_out']} captions, less than one batch ({plan.batch_size}): the filter "
            f"rejects nearly everything at threshold {plan.threshold}. Train longer (--minutes) or lower the threshold."
        )

    # step 4: pre-train again on the cleaned set, same budget
    with clock.phase("pre-training (cleaned)"):
        cleaned_model = _pretrain(out / "blip_cleaned", cleaned, plan, vision, tokenizer, seed=seed)

    # step 5: retrieval noisy vs cleaned; the filter against the injected captions
    with clock.phase("evaluation"):
        test = web / "test.json"
        retrieval = {}
        for name, model_dir in (("noisy", noisy_model), ("cleaned", cleaned_model)):
            scores = evaluate.evaluate_retrieval(model_dir, test, k_test=plan.k_test)
            retrieval[name] = {k: scores[k] for k in ("itc", "itm")}
        injected = [bool(r.get("noisy")) for r in json.loads((web / "train.json").read_text())]
        decisions = load_progress(cleaned)
        metrics: dict[str, Any] = {
            "recipe": "capfilt", "world": world, "plan": asdict(plan), "machine": describe_machine(),
            "capfilt": {
                "noise_fraction": plan.noise_fraction,
                "injected": sum(injected),
                "summary": {k: v for k, v in summary.items() if k not in ("settings", "skipped", "out", "progress")},
                "filter": filter_scores(decisions, injected),
                "filter_sweep": filter_sweep(decisions, injected),
                "retrieval": retrieval,
                "r1": {name: _mean_r1(r) for name, r in retrieval.items()},
                "captioner": _captions(captioner, test, plan),
            },
        }  # fmt: skip
    metrics["seconds"] = {**clock.seconds, "total": round(time.perf_counter() - started, 1)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print_capfilt_table(metrics)
    return metrics


def filter_scores(
    decisions: dict[int, dict[str, Any]], injected: list[bool], threshold: float | None = None
) -> dict[str, float | int]:
    """The filter as a detector of the injected captions: a removed original caption is a
    positive. precision = removed injected / removed; recall = removed injected / injected.
    `threshold`: score the decisions a run at that threshold would have made (from the stored
    ITM scores) instead of the ones this run made."""
    counts = {"removed_injected": 0, "removed_clean": 0, "kept_injected": 0, "kept_clean": 0}
    for row, result in decisions.items():
        if "skipped" in result:
            continue
        for item in result["original"]:
            kept = item["kept"] if threshold is None else item["itm_score"] >= threshold
            key = ("kept" if kept else "removed") + ("_injected" if injected[row] else "_clean")
            counts[key] += 1
    removed = counts["removed_injected"] + counts["removed_clean"]
    positives = counts["removed_injected"] + counts["kept_injected"]
    return {
        **counts,
        "precision": counts["removed_injected"] / removed if removed else 0.0,
        "recall": counts["removed_injected"] / positives if positives else 0.0,
    }


# Thresholds the demo also scores the filter at. ITM trains on one positive for two negatives per
# image: unweighted (BLIP), its match probability carries that 1:2 prior and even odds sit at 1/3;
# the demo's filter weighs the positive twice (`itm_positive_weight`), which moves them to 1/2.
SWEEP_THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 1 / 3, 0.5, 0.7)


def filter_sweep(decisions: dict[int, dict[str, Any]], injected: list[bool]) -> list[dict[str, float]]:
    """Precision and recall of the filter at each of `SWEEP_THRESHOLDS`."""
    return [
        {"threshold": round(t, 4), **{k: v for k, v in filter_scores(decisions, injected, t).items()
                                      if k in ("precision", "recall")}}
        for t in SWEEP_THRESHOLDS
    ]  # fmt: skip


def print_capfilt_table(metrics: dict[str, Any]) -> None:
    c = metrics["capfilt"]
    s, f, r = c["summary"], c["filter"], c["retrieval"]
    rows = [
        ("injected mismatched captions", f"{c['injected']} of {s['captions_in']}"),
        ("capfilt: kept / removed / added", f"{s['kept']} / {s['removed']} / {s['added']}"),
        ("filter precision / recall (injected)", f"{f['precision']:.3f} / {f['recall']:.3f}"),
        *[(f"  at threshold {p['threshold']:.2f}", f"{p['precision']:.3f} / {p['recall']:.3f}")
          for p in c.get("filter_sweep", [])],
    ]
    for name in ("noisy", "cleaned"):
        rows.append((
            f"retrieval R@1 i2t / t2i (ITM), {name}",
            f"{r[name]['itm']['i2t_r1']:.3f} / {r[name]['itm']['t2i_r1']:.3f}  "
            f"(ITC {r[name]['itc']['i2t_r1']:.3f} / {r[name]['itc']['t2i_r1']:.3f})",
        ))  # fmt: skip
    captioner = c["captioner"]
    rows.append(("captioner: attributes right / CIDEr", f"{captioner['exact_match']:.3f} / {captioner['cider']:.3f}"))
    _print_rows(rows, metrics["seconds"], metrics.get("machine"))


# ------------------------------------------------------------------------------------------
# shared steps
# ------------------------------------------------------------------------------------------
def _vision(world: str, *, cache_dir: str | Path | None, seed: int, fast: bool) -> dict[str, Any]:
    """The ViT to train: the cached ShapesWorld ViT's config and weights, read at its last block."""
    from qformer.world.backbones import ensure_backbones

    backbones = ensure_backbones(world, cache_dir=cache_dir, seed=seed, fast=fast, train_bert=False)  # type: ignore[arg-type]
    return {"source": "open_clip", "name": backbones["vit_config"], "pretrained": backbones["vit_weights"], "layer": -1}


def _scaled(plan: BlipDemoPlan, minutes: float | None, started: float, recipe: str, fast: bool) -> BlipDemoPlan:
    if minutes is None or fast:
        return plan
    left = minutes * 60 - (time.perf_counter() - started)
    return plan.scaled(max(0.1, left / DEFAULT_SECONDS[recipe]))


def _common(plan: BlipDemoPlan, seed: int, steps: int) -> dict[str, Any]:
    return dict(
        batch_size=plan.batch_size, max_steps=steps, save_every=steps, log_every=max(1, min(25, steps // 4)),
        mixed_precision="no", seed=seed, weight_decay=0.05, augment=False,
    )  # fmt: skip


def _pretrain(
    output_dir: Path, train: Path, plan: BlipDemoPlan, vision: dict, tokenizer: Path, *, seed: int, share: bool = True
) -> Path:
    from recipes.blip import BlipRecipe, BlipSettings
    from recipes.common import run as run_recipe

    s = BlipSettings(
        recipe="blip_pretrain", output_dir=str(output_dir), train_data=str(train), vision=vision,
        tokenizer=str(tokenizer), blip_preset="tiny",
        blip=dict(
            hidden_size=plan.hidden_size, num_layers=plan.num_layers, num_heads=4, intermediate_size=2 * plan.hidden_size,
            embed_dim=64, max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0,
            queue_size=20 * plan.batch_size, prompt="", share_encoder_decoder=share,
        ),
        lr=plan.lr, min_lr=plan.lr / 10, warmup_lr=1e-5, warmup_steps=max(1, plan.pretrain_steps // 20),
        **_common(plan, seed, plan.pretrain_steps),
    )  # fmt: skip
    run_recipe(BlipRecipe(s))
    return output_dir / "model"


def _finetune(output_dir: Path, recipe: str, init_from: Path, train: Path, plan: BlipDemoPlan, *, seed: int) -> Path:
    from recipes.blip import BlipRecipe, BlipSettings
    from recipes.common import run as run_recipe

    # the caption prompt of BLIP's fine-tuning; the filter keeps the pre-training queue size and
    # weighs ITM's one positive against its two negatives (BLIP does not), so that its match
    # probability means even odds at CapFilt's threshold of 0.5
    blip = {"prompt": "a picture of "} if recipe == "blip_caption" else {"itm_positive_weight": 2.0}
    s = BlipSettings(
        recipe=recipe, output_dir=str(output_dir), train_data=str(train), init_from=str(init_from), blip=blip,
        use_image_ids=recipe == "blip_retrieval", lr=plan.lr, min_lr=plan.lr / 10, warmup_lr=plan.lr,
        warmup_steps=0, **_common(plan, seed, plan.finetune_steps),
    )  # fmt: skip
    run_recipe(BlipRecipe(s))
    return output_dir / "model"


def _captions(model_dir: Path, data: Path, plan: BlipDemoPlan) -> dict[str, float]:
    from qformer import evaluate

    scores = evaluate.evaluate_captions(model_dir, data, num_beams=plan.num_beams, max_new_tokens=20)
    return {k: scores[k] for k in ("bleu4", "cider", "exact_match")}


def _mean_r1(retrieval: dict[str, Any]) -> float:
    return (retrieval["itm"]["i2t_r1"] + retrieval["itm"]["t2i_r1"]) / 2


def _print_rows(rows: list[tuple[str, str]], seconds: dict[str, float], machine: dict[str, Any] | None = None) -> None:
    rows = [*rows, *([("machine", machine_row(machine))] if machine else [])]
    rows.append(("seconds", ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())))
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows))
