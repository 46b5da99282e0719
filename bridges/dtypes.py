"""The compute dtype of the frozen parts, chosen per device. One rule for every bridge.

* CUDA: bf16 where the GPU supports it (Ampere and later), else fp16.
* CPU: fp32. bf16 is opt-in (`compute_dtype=torch.bfloat16`): CPUs with AVX512_BF16 or AMX run it
  natively (about 3x the fp32 speed for a ViT here), but on the many CPUs without them a bf16
  matmul is emulated and about 100x slower, and fp32 keeps results the same on every machine.
* Anything else: fp32.
"""

from __future__ import annotations

import warnings

import torch


def cpu_has_native_bf16() -> bool:
    """True only where the CPU does bf16 matmuls in hardware (AVX512_BF16 or AMX).

    torch exposes the two instruction-set probes only as private helpers, so any doubt answers False.
    """
    # ATen's dispatch level: "AVX512" is needed for its bf16 kernels; AVX2, DEFAULT and ARM get fp32.
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    except Exception:  # a probe that fails tells us nothing: stay on fp32
        return False


def default_compute_dtype(device: str | torch.device | None = None) -> torch.dtype:
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_compute_dtype(dtype: torch.dtype | str | None, device: str | torch.device | None) -> torch.dtype:
    """`dtype` as given (a torch dtype or its name, e.g. "bfloat16"), or the device's default;
    warns when bf16 is asked for on a CPU that would emulate it."""
    if dtype is None:
        return default_compute_dtype(device)
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"compute_dtype={dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
        dtype = resolved
    on_cpu = torch.device("cpu" if device is None else device).type == "cpu"
    if on_cpu and dtype == torch.bfloat16 and not cpu_has_native_bf16():
        warnings.warn(
            "compute_dtype=bfloat16 on a CPU without native bf16 (AVX512_BF16/AMX): every matmul is "
            "emulated, about 100x slower than float32. Use float32 on this machine.",
            stacklevel=3,
        )
    return dtype
