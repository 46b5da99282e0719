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


def test_ablation_paired_summary_matches_a_hand_computation():
    summary = _load("stage1_ablation").paired_summary
    rows = []
    # seed: (CIDEr with stage 1, CIDEr fresh); the other metrics level
    for seed, (w, f) in {0: (5.5, 5.0), 1: (5.0, 5.2), 2: (5.3, 5.0)}.items():
        for arm, cider in (("with stage 1", w), ("without stage 1", f)):
            rows.append({"steps": 400, "arm": arm, "seed": seed, "cider": cider, "all_right": 0.8, "vqa": 0.9,
                         "compositional_all_right": 0.1})  # fmt: skip
    rows.append({"steps": 400, "arm": "with stage 1", "seed": 3, "cider": 9.0, "all_right": 1.0, "vqa": 1.0,
                 "compositional_all_right": 1.0})  # unpaired: no fresh arm for seed 3, so it is left out  # fmt: skip
    # the same runs scored at step 150 (`--eval-at`): a group of its own
    for arm, cider in (("with stage 1", 4.0), ("without stage 1", 3.0)):
        rows.append({"steps": 400, "at": 150, "arm": arm, "seed": 0, "cider": cider, "all_right": 0.5, "vqa": 0.5,
                     "compositional_all_right": 0.0})  # fmt: skip
    found = summary(rows)
    early = {s["metric"]: s for s in found if s["at"] == 150}
    assert early["cider"]["seeds"] == 1 and early["cider"]["diff_mean"] == 1.0 and early["cider"]["diff_sd"] == 0.0
    by_metric = {s["metric"]: s for s in found if s["at"] == 400}
    cider = by_metric["cider"]
    assert cider["seeds"] == 3
    assert abs(cider["with_mean"] - 15.8 / 3) < 1e-9  # (5.5 + 5.0 + 5.3) / 3
    assert abs(cider["diff_mean"] - 0.2) < 1e-9  # (0.5 - 0.2 + 0.3) / 3
    # sample standard deviation of (0.5, -0.2, 0.3) about 0.2: sqrt((0.09 + 0.16 + 0.01) / 2)
    assert abs(cider["diff_sd"] - (0.26 / 2) ** 0.5) < 1e-9
    assert (cider["ahead"], cider["level"], cider["behind"]) == (2, 0, 1)
    assert (by_metric["vqa"]["ahead"], by_metric["vqa"]["level"], by_metric["vqa"]["behind"]) == (0, 3, 0)
