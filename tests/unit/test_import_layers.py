"""Import direction (STYLE.md): a lower layer never imports a higher one.

0: losses, adapters, quant, data.collate, data.packing, errors (torch only) → 1: config, data, models, training
→ 2: rollout, eval, export → 3: recipes, board → 4: cli. Imports inside functions count too.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "tunelab"


def layer(module: str) -> int | None:
    parts = module.split(".")[1:]
    if not parts:
        return None
    if ".".join(parts[:2]) in ("data.collate", "data.packing") or parts[0] in ("losses", "adapters", "quant", "errors"):
        return 0
    return {"config": 1, "data": 1, "models": 1, "training": 1, "rollout": 2, "eval": 2, "export": 2,
            "recipes": 3, "board": 3, "cli": 4}.get(parts[0])


def upward_imports(package: Path = PACKAGE) -> list[tuple[str, str]]:
    found = []
    for path in sorted(package.rglob("*.py")):
        module = "tunelab." + ".".join(path.relative_to(package).with_suffix("").parts).removesuffix(".__init__")
        mine = layer(module)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tunelab."):
                theirs = layer(node.module)
                if mine is not None and theirs is not None and theirs > mine:
                    found.append((module, node.module))
    return found


def test_no_module_imports_a_higher_layer():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path):
    """Guard: a planted upward import (losses → recipes) is reported; a downward one is not."""
    planted = tmp_path / "tunelab"
    (planted / "losses").mkdir(parents=True)
    (planted / "recipes").mkdir()
    (planted / "losses" / "bad.py").write_text("def f():\n    from tunelab.recipes.sft import train\n")
    (planted / "recipes" / "ok.py").write_text("from tunelab.losses.causal_lm import causal_lm_loss\n")
    assert upward_imports(planted) == [("tunelab.losses.bad", "tunelab.recipes.sft")]
