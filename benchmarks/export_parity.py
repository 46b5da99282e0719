"""Do the exported artifacts caption like the checkpoint they came from? On real images of a
data file, greedy captions from

  ours:         `Stage2Model.generate(num_beams=1)` (what `qformer caption --num-beams 1` prints),
  hf-blip2:     transformers' `Blip2ForConditionalGeneration` loaded from `qformer export --format
                hf-blip2`, fed by the exported `Blip2Processor`,
  soft-prompt:  the unmodified LLM's own `generate(inputs_embeds=...)` after `SoftVisualPrompt`
                (decoder-only LLMs),

compared string for string. The tests check the same on tiny random models; this runs it on a
trained checkpoint (the demo's):

    python benchmarks/export_parity.py runs/demo/stage2/model runs/demo/data/test.json --n 64
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("data")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=30)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer, Blip2ForConditionalGeneration, Blip2Processor

    from bridges.vision import load_image
    from qformer import SoftVisualPrompt
    from qformer.evaluate import read_records
    from qformer.export import export_soft_prompt
    from qformer.hf_blip2 import export_hf_blip2
    from qformer.stage2 import Stage2Model

    records, root = read_records(args.data)
    images = [load_image(root / r["image"]) for r in records[: args.n]]
    ours = Stage2Model.from_pretrained(args.checkpoint).eval()
    greedy = {"num_beams": 1, "max_new_tokens": args.max_new_tokens}
    pixels = torch.stack([ours.vision.eval_transform()(image) for image in images])
    with torch.no_grad():
        expected = ours.generate(pixel_values=pixels, **greedy)
    results: dict[str, int] = {}

    with tempfile.TemporaryDirectory() as tmp:
        # transformers BLIP-2
        target = export_hf_blip2(args.checkpoint, Path(tmp) / "hf")
        hf = Blip2ForConditionalGeneration.from_pretrained(target).eval()
        processor = Blip2Processor.from_pretrained(target, backend="pil")
        prompt = json.loads((Path(target) / "qformer_export.json").read_text())["prompt"] or ""
        config = hf.generation_config
        config.update(**greedy)
        got = []
        for i in range(0, len(images), 16):
            inputs = processor(images=images[i : i + 16], text=[prompt] * len(images[i : i + 16]), padding=True,
                               return_tensors="pt")  # fmt: skip
            with torch.no_grad():
                out = hf.generate(**inputs, generation_config=config)
            if not hf.config.use_decoder_only_language_model:
                out = out[:, 1:]
            else:
                out = out[:, inputs.input_ids.shape[1] :]
            got += [t.split("\n")[0].strip() for t in processor.batch_decode(out, skip_special_tokens=True)]
        results["hf-blip2"] = sum(a == b for a, b in zip(got, expected))
        print_diffs("hf-blip2", got, expected)

        # soft visual prompt + the unmodified LLM
        if hf.config.use_decoder_only_language_model:
            svp = SoftVisualPrompt.from_pretrained(export_soft_prompt(args.checkpoint, Path(tmp) / "sp"))
            llm = AutoModelForCausalLM.from_pretrained(svp.manifest["llm"]).eval()
            tok = AutoTokenizer.from_pretrained(svp.manifest["llm"])
            eos = svp.manifest["eos_token_id"]
            got = []
            for image in images:
                with torch.no_grad():
                    soft, mask = svp([image])
                    ids = tok(svp.manifest["prompt"] or "", return_tensors="pt").input_ids
                    embeds = torch.cat([soft, llm.get_input_embeddings()(ids)], dim=1)
                    out = llm.generate(inputs_embeds=embeds, attention_mask=torch.cat([mask, torch.ones_like(ids)], 1),
                                       do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id, **greedy)  # fmt: skip
                row = out[0].tolist()
                got.append(tok.decode(row[: row.index(eos)] if eos in row else row, skip_special_tokens=True).strip())
            results["soft-prompt"] = sum(a == b for a, b in zip(got, expected))
            print_diffs("soft-prompt", got, expected)

    n = len(images)
    print(f"\n{n} images, greedy, max_new_tokens={args.max_new_tokens}; e.g. {expected[0]!r}")
    for name, same in results.items():
        print(f"{name:12s} same caption as ours: {same}/{n}")


def print_diffs(name: str, got: list[str], expected: list[str]) -> None:
    for i, (a, b) in enumerate(zip(got, expected)):
        if a != b:
            print(f"[{name}] image {i}: {a!r} != ours {b!r}")


if __name__ == "__main__":
    main()
