"""Time one stage-1 training step (forward + backward) against the original's compute pattern.

The reference is the original's compute pattern in the same process: the ITM pass projects the
image tokens to cross-attention keys/values again for all 3b pairs (the original feeds the ITM
pass `image_embeds` [pos; neg; pos]), and every pass computes every row of its last layer (the
ITM head reads only the queries' rows, ITC only the text's [CLS]), while the ITG pass reuses the
query pass's cache as the original does. Each of our two savings is also timed without the
other. Also times our query-only pass against transformers' `Blip2QFormerModel` on the same
weights. Prints ratios; nothing here asserts a time.

    python benchmarks/stage1_step.py [--preset blip2 | --config DIR/config.json] [--batch 8]
        [--layers 12] [--image-tokens 257] [--text-len 32] [--repeats 3]

`--config` takes a stage-1 checkpoint's `config.json` (for example the demo's
`runs/demo/stage1/model/config.json`: `--batch 48 --image-tokens 10 --text-len 14` is its step).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from qformer import QFormer, QFormerConfig, Stage1Model


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
    ap.add_argument("--config", default=None, help="a stage-1 checkpoint's config.json (its `qformer` section)")
    ap.add_argument("--layers", type=int, default=None, help="override num_layers (CPU: fewer is quicker)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-tokens", type=int, default=257)
    ap.add_argument("--text-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    overrides = {"hidden_dropout": 0.0, "attention_dropout": 0.0}
    if args.layers:
        overrides["num_layers"] = args.layers
    if args.config:
        with open(args.config) as f:
            saved = json.load(f)
        cfg = QFormerConfig.from_dict({**saved.get("qformer", saved), **overrides})
    else:
        cfg = QFormerConfig.from_name(args.preset, **overrides)
    torch.manual_seed(0)
    image = torch.randn(args.batch, args.image_tokens, cfg.vision_width)
    ids = torch.randint(1, cfg.vocab_size - 1, (args.batch, args.text_len))
    mask = torch.ones_like(ids)

    ours = Stage1Model(cfg, itm_negatives="hardest")
    original = Stage1Model(cfg, itm_negatives="hardest", reuse_image_kv=False, reuse_query_cache=True)
    original.load_state_dict(ours.state_dict())

    def step(model, every_row=False):
        def run():
            model.zero_grad(set_to_none=True)
            with every_last_row() if every_row else contextlib.nullcontext():
                model(image, ids, mask)["loss"].backward()

        return run

    t_ours = timed(step(ours), args.repeats)
    t_rows = timed(step(ours, every_row=True), args.repeats)
    t_kv = timed(step(original), args.repeats)
    t_orig = timed(step(original, every_row=True), args.repeats)
    name = args.config or args.preset
    print(f"config: {name}, {cfg.num_layers} layers, width {cfg.hidden_size}, batch {args.batch}, "
          f"{args.image_tokens} image tokens, text {args.text_len}, device cpu")  # fmt: skip
    print(f"stage-1 step, original pattern (ITM re-projects the image, every last-layer row): {t_orig * 1000:8.1f} ms")
    print(f"stage-1 step, image K/V once per step, every last-layer row:                   {t_rows * 1000:8.1f} ms  ({t_orig / t_rows:.2f}x)")
    print(f"stage-1 step, ITM re-projects the image, last layer only the rows read:       {t_kv * 1000:8.1f} ms  ({t_orig / t_kv:.2f}x)")
    print(f"stage-1 step, ours (both):                                                    {t_ours * 1000:8.1f} ms  ({t_orig / t_ours:.2f}x)")

    _compare_with_transformers(ours, image, args.repeats)


@contextlib.contextmanager
def every_last_row():
    """Every pass computes every row of its last layer, as the original does."""
    forward = QFormer.forward

    def full(self, **kwargs):
        kwargs.pop("outputs", None)
        return forward(self, **kwargs)

    QFormer.forward = full
    try:
        yield
    finally:
        QFormer.forward = forward


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
