"""Built-in image-text worlds: small, procedural, deterministic datasets on which the whole BLIP-2
pipeline trains in minutes on a CPU. `qformer.world.shapes` is ShapesWorld.

Nothing is imported here, so that `python -m qformer.world.shapes` runs the module once."""
