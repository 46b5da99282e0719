"""The benchmark scripts' own logic, where it computes a number (their runs only print)."""

import importlib.util
from pathlib import Path

import torch


def _load(name: str):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vit_probe_reads_what_the_tokens_carry_and_no_more():
    probe = _load("vit_probe").probe
    g = torch.Generator().manual_seed(0)
    labels = [["circle", "square", "star"][i % 3] for i in range(600)]
    centres = torch.randn(3, 16, generator=g) * 3
    x = torch.stack([centres[i % 3] for i in range(600)]) + torch.randn(600, 16, generator=g)
    train = torch.arange(600) < 480
    assert probe(x, labels, train).float().mean() > 0.95  # the label is in the tokens
    noise = torch.randn(600, 16, generator=g)
    assert probe(noise, labels, train).float().mean() < 0.5  # it is not: chance is 1/3
