"""Frozen backbones on either side of the Q-Former.

`bridges.vision`: an image tower (open_clip, timm inside open_clip, transformers) -> tokens [b, n, d],
plus the image transforms. `bridges.language`: a frozen LLM that reads a soft visual prompt.
`bridges.lora`: optional LoRA adapters (peft) on either, what both bridges share of them.

Import from the submodules (`from bridges.vision import VisionBridge`); this package imports
nothing itself, so importing one bridge never pulls in the other's dependencies.
"""
