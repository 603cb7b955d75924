"""Import rules: a method imports no model family; a model family imports no method."""
import ast
from pathlib import Path

import megadistill

ROOT = Path(megadistill.__file__).parent


def _imports(path: Path):
    """Absolute module names imported by ``path`` (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            names += [module] + [f"{module}.{a.name}" for a in node.names]
    return names


def _violations(folder: str, forbidden: str):
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in _imports(path):
            if name == forbidden or name.startswith(forbidden + "."):
                found.append(f"{path.relative_to(ROOT.parent)} imports {name}")
    return found


def test_methods_import_no_model_family():
    assert list((ROOT / "methods").glob("*.py")), "no method modules found"
    assert _violations("methods", "megadistill.models") == []


def test_model_families_import_no_method():
    assert (ROOT / "models" / "wan" / "adapter.py").exists()
    assert _violations("models", "megadistill.methods") == []


def test_the_scanner_sees_relative_imports():
    names = _imports(ROOT / "methods" / "dmd2.py")
    assert "megadistill.methods.roles" in " ".join(names)  # `from .roles import ...` resolved
