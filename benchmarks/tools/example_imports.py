"""How many of TorchRec's example imports resolve with ``torchrec`` replaced by ``jaggedrec``.

    python benchmarks/tools/example_imports.py EXAMPLES_DIR [--list]

EXAMPLES_DIR is TorchRec's ``examples/`` folder (``git archive v1.8.0-rc1 examples`` of a
TorchRec clone). Counts each distinct ``(module, name)`` of ``from torchrec.X import Y`` and
``import torchrec.X`` (``torchrec.github.*``, the examples importing one another, left out),
and how many uses of them resolve: the module imports and has the name, or the name is a
submodule. To measure an older tree, put it first on PYTHONPATH in an environment where
jaggedrec is not installed in editable mode (an editable install's finder wins for submodules).
"""

import ast
import collections
import importlib
import importlib.util
import pathlib
import sys


def count(root: pathlib.Path):
    uses = collections.Counter()
    for path in root.rglob("*.py"):
        try:
            tree = ast.parse(path.read_text())
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                    and node.module.split(".")[0] == "torchrec" and not node.module.startswith("torchrec.github"):
                uses.update((node.module, a.name) for a in node.names)
            elif isinstance(node, ast.Import):
                uses.update((a.name, None) for a in node.names if a.name.split(".")[0] == "torchrec")
    return uses


def resolves(module: str, name) -> bool:
    ours = "jaggedrec" + module[len("torchrec"):]
    try:
        found = importlib.import_module(ours)
        return name is None or hasattr(found, name) or importlib.util.find_spec(f"{ours}.{name}") is not None
    except Exception:  # any failure to import is a path that does not resolve
        return False


def main() -> None:
    uses = count(pathlib.Path(sys.argv[1]))
    ok = {key: resolves(*key) for key in uses}
    if "--list" in sys.argv:
        for (module, name), n in uses.most_common():
            print("OK " if ok[(module, name)] else "-- ", n, module, name or "")
    print(f"{sum(ok.values())}/{len(uses)} pairs resolve, "
          f"{sum(n for key, n in uses.items() if ok[key])}/{sum(uses.values())} uses")


if __name__ == "__main__":
    main()
