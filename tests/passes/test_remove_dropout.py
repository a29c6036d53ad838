"""RemoveDropout: structure, numerics, it fired, and it leaves training-mode dropout alone."""

import torch
from torch import nn

from effcompile.compiler import ir
from effcompile.compiler.pass_manager import PassContext, PassManager
from effcompile.passes import RemoveDropout
from effcompile.testing import capture


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return self.drop(torch.relu(self.fc(x))) + x


def _run(model, x):
    gm, example = capture(model, x)[0]
    ir.annotate(gm, example)
    (rec,) = PassManager([RemoveDropout()]).run(gm, PassContext(example))
    return gm, example, rec


def _dropouts(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and ir.target_name(n) == "dropout"]


def test_removes_eval_dropout_exactly():
    model, x = Block().eval(), torch.randn(3, 8)
    gm, example, rec = _run(model, x)
    assert rec.modified and rec.count == 1 and not _dropouts(gm)
    torch.testing.assert_close(gm(*example)[0], model(x), rtol=0, atol=0)


def test_keeps_training_dropout():
    model = Block().train()
    gm, _, rec = _run(model, torch.randn(3, 8))
    assert not rec.modified and rec.count == 0 and len(_dropouts(gm)) == 1
