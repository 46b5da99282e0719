"""The `qformer` command.

Subcommands land with the parts they drive; each one's `--help` says what it does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _import(args: argparse.Namespace) -> int:
    from qformer import convert
    from qformer.config import QFormerConfig

    out = Path(args.out)
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
    else:
        from transformers import Blip2ForImageTextRetrieval

        hf = Blip2ForImageTextRetrieval.from_pretrained(args.src)
        model, report = convert.stage1_from_hf_retrieval(hf)
    model.save_pretrained(out)
    print(report.summary())
    print(f"wrote a stage-1 checkpoint to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qformer",
        description="Train BLIP-2 style Q-Former adapters between a frozen vision tower and a frozen LLM.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "import",
        help="convert a LAVIS or transformers BLIP-2 retrieval checkpoint into a stage-1 checkpoint",
        description=(
            "Read the Q-Former, its heads and ln_vision from a LAVIS file (.pth, loaded with "
            "weights_only=True, or .safetensors) or from a directory that "
            "transformers.Blip2ForImageTextRetrieval.from_pretrained loads, and write our stage-1 "
            "checkpoint (config.json + model.safetensors). Keys are matched strictly: anything "
            "unknown, missing or of the wrong shape stops the import and is named."
        ),
    )
    p.add_argument("--from", dest="source_format", choices=["lavis", "hf-blip2"], required=True)
    p.add_argument("src", help="LAVIS checkpoint file, or transformers model directory / hub name")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--preset", default="blip2", help="architecture of a LAVIS file (default: blip2)")
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
