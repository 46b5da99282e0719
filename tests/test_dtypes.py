"""One compute-dtype rule for every bridge: fp32 on CPUs unless asked, bf16/fp16 on GPUs."""

import pytest
import torch

from bridges.dtypes import cpu_has_native_bf16, default_compute_dtype, resolve_compute_dtype


def test_default_compute_dtype_per_device(monkeypatch):
    assert default_compute_dtype("cpu") == torch.float32
    assert default_compute_dtype(None) == torch.float32
    assert default_compute_dtype("meta") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert default_compute_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert default_compute_dtype("cuda:0") == torch.float16


def test_native_bf16_probe(monkeypatch):
    cpu = torch.backends.cpu
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    # AVX2-only CPU: emulated bf16, even if a bf16 probe said yes
    monkeypatch.setattr(cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert not cpu_has_native_bf16()
    monkeypatch.setattr(cpu, "get_cpu_capability", lambda: "AVX512")
    assert cpu_has_native_bf16()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert not cpu_has_native_bf16()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: 1 / 0, raising=False)
    assert not cpu_has_native_bf16()  # a probe that fails is a no


def test_bf16_on_an_emulating_cpu_warns(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with pytest.warns(UserWarning, match="100x slower"):
        assert resolve_compute_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_compute_dtype(None, "cpu") == torch.float32
    with pytest.raises(ValueError, match="not a torch dtype"):
        resolve_compute_dtype("float33", "cpu")
