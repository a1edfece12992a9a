"""The one layer boundary import-linter cannot see: the kernels are installed as
``jaggedrec.kernels`` from the top-level ``kernels/`` folder, so its graph of ``jaggedrec``
misses them. Only the op layer (``jaggedrec/ops``) may import them; the rest of the layering is
in pyproject.toml's import-linter contracts."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_only_the_ops_import_the_kernels():
    offenders = []
    for path in sorted((ROOT / "jaggedrec").rglob("*.py")):
        if path.relative_to(ROOT).parts[:2] == ("jaggedrec", "ops"):
            continue
        for module, names in _imports(path):
            if module.startswith("jaggedrec.kernels") or (module == "jaggedrec" and "kernels" in names):
                offenders.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not offenders, offenders
    # and the ops do import them: the check above looks at the right names
    assert any(m.startswith("jaggedrec.kernels") for p in (ROOT / "jaggedrec" / "ops").glob("*.py")
               for m, _ in _imports(p))
