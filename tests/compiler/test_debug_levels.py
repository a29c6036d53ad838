"""EFFCOMPILE_DEBUG=1..4 logs more at each level: passes, graphs, kernels, kernel source."""

import logging

import pytest
import torch

import effcompile as ec


@pytest.mark.parametrize("level,expect,absent", [
    ("1", ["pass remove_dropout"], ["graph after", "kernel ", "source of"]),
    ("2", ["pass remove_dropout", "graph after remove_dropout"], ["source of"]),
    ("4", ["kernel ", "source of", "@triton.jit"], []),
])
def test_debug_levels(monkeypatch, caplog, level, expect, absent):
    monkeypatch.setenv("EFFCOMPILE_DEBUG", level)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.1), torch.nn.GELU()).eval()
    with caplog.at_level(logging.INFO, logger="effcompile"):
        ec.effcompile(model, cache=False, use_triton=False)(torch.randn(2, 8))  # kernels on CPU
    text = caplog.text
    for e in expect:
        assert e in text, (e, text[-2000:])
    for a in absent:
        assert a not in text, a


def test_bad_debug_level_names_the_variable(monkeypatch):
    monkeypatch.setenv("EFFCOMPILE_DEBUG", "loud")
    with pytest.raises(Exception, match="EFFCOMPILE_DEBUG"):
        ec.effcompile(torch.nn.Linear(2, 2), cache=False)(torch.randn(1, 2))
