"""The house's one rule, checked: every import in migpipe runs down the layers that
migpipe/__init__ lists, so a newcomer can read the code from the bottom up and no change
can tie two layers into a knot without failing here."""

import ast
from pathlib import Path

import migpipe

LAYERS = [
    {"errors", "units", "running", "lines"},
    {"stream"},
    {"io"},
    {"keys"},
    {"chain"},
    {"wire"},
    {"tunnel"},
    {"tools"},
    {"save"},
    {"service"},
    {"qemu"},
    {"cli", "__main__"},
]
ROOT = Path(migpipe.__file__).parent


def layer_of(module: str) -> int:
    """The layer of `migpipe.x.y` (its first part), or -1 for migpipe itself (__version__)."""
    parts = module.split(".")
    if len(parts) == 1:
        return -1
    return next(n for n, layer in enumerate(LAYERS) if parts[1] in layer)


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("migpipe"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("migpipe"))
    return found


def test_every_module_belongs_to_a_layer() -> None:
    modules = {p.stem for p in ROOT.glob("*.py")} - {"__init__"}
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert modules | packages == set().union(*LAYERS)


def test_imports_run_downward() -> None:
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(("migpipe", *parts)).removesuffix(".__init__")
        own = layer_of(module)
        for imported in imports(path):
            if layer_of(imported) > own:
                upward.append(f"{module} imports {imported}")
    assert upward == []


def test_every_package_is_installed() -> None:
    """pyproject.toml lists the packages by hand (the plug-ins install under another name):
    a new package left out of it would work from the checkout and be missing once installed."""
    import tomllib

    listed = set(
        tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["tool"]["setuptools"][
            "packages"
        ]
    )
    found = {".".join(p.parent.relative_to(ROOT.parent).parts) for p in ROOT.rglob("__init__.py")}
    assert found | {"migpipe_filters"} == listed
