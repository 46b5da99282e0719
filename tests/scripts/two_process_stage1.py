"""Run by tests/test_distributed.py under `accelerate launch --num_processes 2` (gloo, CPU), and
directly in one process. Each process takes its contiguous slice of one global batch of pairs,
computes the stage-1 losses with cross-process gathers, and backpropagates under DDP. Rank 0
writes the mean losses over processes and the (DDP-averaged) gradients to OUT.

    python two_process_stage1.py OUT [--gather-grad]
"""

import sys

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from qformer import QFormerConfig, Stage1Model

GLOBAL_BATCH, TOKENS, TEXT = 8, 5, 6


def main() -> None:
    out, gather_grad = sys.argv[1], "--gather-grad" in sys.argv
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    cfg = QFormerConfig.from_name("tiny", hidden_dropout=0.0, attention_dropout=0.0)
    model = Stage1Model(cfg, itm_negatives="hardest", itc_gather_grad=gather_grad)
    g = torch.Generator().manual_seed(1)
    image = torch.randn(GLOBAL_BATCH, TOKENS, cfg.vision_width, generator=g)
    ids = torch.randint(1, cfg.vocab_size - 1, (GLOBAL_BATCH, TEXT), generator=g)
    mask = torch.ones_like(ids)  # equal lengths: the ITG token mean is then the same either way
    if "--ragged" in sys.argv:  # each process padded to its own longest text, as a tokenizer does
        mask[GLOBAL_BATCH // 2 :, -2:] = 0
        ids = ids.masked_fill(mask == 0, cfg.pad_token_id)
    b = GLOBAL_BATCH // acc.num_processes
    mine = slice(acc.process_index * b, (acc.process_index + 1) * b)
    model = acc.prepare(model)  # DDP: gradients averaged over processes
    my_ids, my_mask = ids[mine], mask[mine]
    if "--ragged" in sys.argv:
        keep = int(my_mask.sum(1).max())
        my_ids, my_mask = my_ids[:, :keep], my_mask[:, :keep]
    losses = model(image[mine], my_ids, my_mask)
    acc.backward(losses["loss"])
    mean = {k: acc.reduce(v.detach(), reduction="mean") for k, v in losses.items()}
    if acc.is_main_process:
        grads = {f"grad.{n}": p.grad for n, p in acc.unwrap_model(model).named_parameters() if p.grad is not None}
        save_file({**{f"loss.{k}": v.reshape(1) for k, v in mean.items()}, **grads}, out)
    acc.wait_for_everyone()
    # tear the gloo group down before the interpreter does: left to exit, a rank once aborted
    # at exit ("terminate called without an active exception") and failed the test
    acc.end_training()


if __name__ == "__main__":
    main()
