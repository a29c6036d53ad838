"""Timing helpers: the GPU-kernel summary of a profiled decode step (fed fake profiler events here)."""

from types import SimpleNamespace

import torch

from effcompile.bench import timing


def _event(name, us, device=torch.autograd.DeviceType.CUDA):
    return SimpleNamespace(name=name, device_type=device,
                           time_range=SimpleNamespace(elapsed_us=lambda: us))


def test_kernel_summary_counts_gpu_work_only_and_sorts_by_time():
    events = [_event("_matmul_kernel", 30.0), _event("_kernel", 2.0), _event("_matmul_kernel", 28.5),
              _event("Memset (Device)", 1.0), _event("_kernel", 2.5),
              _event("aten::mm", 500.0, torch.autograd.DeviceType.CPU)]  # host-side op: not GPU work
    got = timing.summarize_kernels(events, top=2)
    assert got["gpu_kernels"] == 5
    assert got["gpu_busy_ms"] == round((30.0 + 2.0 + 28.5 + 1.0 + 2.5) / 1e3, 4)
    assert got["top"] == [{"name": "_matmul_kernel", "count": 2, "us": 58.5}, {"name": "_kernel", "count": 2, "us": 4.5}]

