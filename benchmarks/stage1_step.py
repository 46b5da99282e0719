"""Time one stage-1 training step (forward + backward) with and without the image K/V reuse.

The reference is the original's compute pattern in the same process: the ITM pass projects the
image tokens to cross-attention keys/values again for all 3b pairs (the original feeds the ITM
pass `image_embeds` [pos; neg; pos]), while the ITG pass reuses the query pass's cache as the
original does. Also times our query-only pass against transformers' `Blip2QFormerModel` on the
same weights. Prints ratios; nothing here asserts a time.

    python benchmarks/stage1_step.py [--preset blip2] [--batch 8] [--layers 12] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from qformer import QFormerConfig, Stage1Model


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="blip2")
    ap.add_argument("--layers", type=int, default=None, help="override num_layers (CPU: fewer is quicker)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-tokens", type=int, default=257)
    ap.add_argument("--text-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    overrides = {"hidden_dropout": 0.0, "attention_dropout": 0.0}
    if args.layers:
        overrides["num_layers"] = args.layers
    cfg = QFormerConfig.from_name(args.preset, **overrides)
    torch.manual_seed(0)
    image = torch.randn(args.batch, args.image_tokens, cfg.vision_width)
    ids = torch.randint(1000, 2000, (args.batch, args.text_len))
    mask = torch.ones_like(ids)

    ours = Stage1Model(cfg, itm_negatives="hardest")
    original = Stage1Model(cfg, itm_negatives="hardest", reuse_image_kv=False, reuse_query_cache=True)
    original.load_state_dict(ours.state_dict())

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(image, ids, mask)["loss"].backward()

        return run

    t_ours = timed(step(ours), args.repeats)
    t_orig = timed(step(original), args.repeats)
    print(f"config: {args.preset}, {cfg.num_layers} layers, batch {args.batch}, {args.image_tokens} image tokens, device cpu")
    print(f"stage-1 step, original pattern (ITM re-projects the image): {t_orig * 1000:8.1f} ms")
    print(f"stage-1 step, ours (image K/V computed once per step):      {t_ours * 1000:8.1f} ms")
    print(f"speed-up: {t_orig / t_ours:.2f}x")

    _compare_with_transformers(ours, image, args.repeats)


def _compare_with_transformers(ours: Stage1Model, image: torch.Tensor, repeats: int) -> None:
    from qformer.convert import qformer_to_hf

    hf, query_tokens, _ = qformer_to_hf(ours.qformer)
    hf.eval()
    ours.eval()
    with torch.no_grad():
        tokens = ours.ln_vision(image)
        t_hf = timed(lambda: hf(query_embeds=query_tokens.expand(image.shape[0], -1, -1), encoder_hidden_states=tokens), repeats)
        t_q = timed(lambda: ours.qformer(image_embeds=tokens), repeats)
        a = hf(query_embeds=query_tokens.expand(image.shape[0], -1, -1), encoder_hidden_states=tokens).last_hidden_state
        b = ours.qformer(image_embeds=tokens).query_output
    print(f"query-only pass, transformers Blip2QFormerModel: {t_hf * 1000:8.1f} ms")
    print(f"query-only pass, ours:                          {t_q * 1000:8.1f} ms  ({t_hf / t_q:.2f}x)")
    print(f"max |difference| of the outputs: {(a - b).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
