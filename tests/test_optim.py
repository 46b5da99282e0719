import pytest
import torch

from qformer.optim import adamw


def test_adamw_is_fused_on_cpu_and_its_first_step_is_adamw_by_hand():
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))
    w.grad, b.grad = torch.randn(5, 3), torch.randn(3)
    before_w, before_b = w.detach().clone(), b.detach().clone()
    lr, wd, eps = 0.1, 0.05, 1e-6
    opt = adamw([{"params": [w], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=eps)
    assert opt.defaults["fused"] is True
    opt.step()
    # step 1: the bias-corrected moments are g and g^2, so the update is lr * g / (|g| + eps), after
    # the decoupled decay p * (1 - lr * wd)
    expected_w = before_w * (1 - lr * wd) - lr * w.grad / (w.grad.abs() + eps)
    expected_b = before_b - lr * b.grad / (b.grad.abs() + eps)
    torch.testing.assert_close(w.detach(), expected_w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.detach(), expected_b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", ["cuda", torch.device("cuda", 1)])
def test_adamw_leaves_the_choice_to_torch_off_the_cpu(device):
    opt = adamw([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, device=device)
    assert opt.defaults["fused"] is None
