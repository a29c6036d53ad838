"""Data flows one way: passes never import codegen or triton; codegen never imports passes."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "effcompile"

FORBIDDEN = {
    "passes": ("effcompile.codegen", "triton"),
    "codegen": ("effcompile.passes",),
    "runtime": ("effcompile.passes",),
}


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the file's package
                base = path.relative_to(PKG.parent).with_suffix("").parts[: -node.level]
                yield ".".join(base + ((node.module,) if node.module else ()))
            elif node.module:
                yield node.module


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_layering(folder):
    bad = []
    for path in sorted((PKG / folder).rglob("*.py")):
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[folder]):
                bad.append(f"{path.relative_to(PKG.parent)} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_violations(tmp_path, monkeypatch):
    fake = tmp_path / "effcompile" / "passes"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("import triton\nfrom ..codegen import lower\n")
    monkeypatch.setattr(__import__(__name__), "PKG", tmp_path / "effcompile")
    names = list(_imports(fake / "bad.py"))
    assert names == ["triton", "effcompile.codegen"]
