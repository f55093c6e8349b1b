"""The module layers of docs/design.md, kept: no module imports from a layer above its own (type-only imports
included), and the policy modules take no reactor."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "inference"

LAYERS = {  # top-level module or package of inference -> its layer (docs/design.md, "Modules and layers")
    **dict.fromkeys(["config", "errors", "schema", "sse", "jsonio", "auth", "logs", "reactor", "epoll", "record",
                     "tenants", "__init__"],
                    0),
    **dict.fromkeys(["routing", "translation", "fairness"], 1),
    "operations": 2,
    "providers": 3,
    **dict.fromkeys(["relay", "admission", "drain", "monitor", "catalog", "telemetry", "quota", "quota_redis",
                     "usage"], 4),
    **dict.fromkeys(["api", "resource", "channel", "request", "cors", "openapi", "openapi_typed"], 5),
    **dict.fromkeys(["service", "tap", "listen", "cli", "admin", "__main__"], 6),
}
WITH_A_CLOCK = {"routing/health.py"}  # the one policy module with timers: its clock is passed in


def imports(path: Path) -> list[tuple[str, str]]:
    """(top-level unit of inference, or the absolute module) for each import in ``path``."""
    package = path.relative_to(PACKAGE).parent.parts
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(package)[:len(package) - node.level + 1]
            target = base + (node.module.split(".") if node.module else [])
            units = [target[0]] if target else [alias.name for alias in node.names]
            found += [("inference", unit) for unit in units]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append(("absolute", node.module))
        elif isinstance(node, ast.Import):
            found += [("absolute", alias.name) for alias in node.names]
    return found


def unit_of(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def test_every_module_has_a_layer_and_imports_nothing_above_it():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = unit_of(path)
        assert unit in LAYERS, f"{path.relative_to(PACKAGE)}: give it a layer in docs/design.md and here"
        for kind, target in imports(path):
            if kind == "inference" and target in LAYERS and LAYERS[target] > LAYERS[unit]:
                upward.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert upward == []


def test_routing_and_translation_take_no_reactor_and_open_no_connection():
    offending = []
    for path in sorted([*PACKAGE.glob("routing/*.py"), *PACKAGE.glob("translation/*.py")]):
        name = str(path.relative_to(PACKAGE))
        for kind, target in imports(path):
            if kind == "absolute" and target.split(".")[0] in ("twisted", "treq", "klein") and \
                    name not in WITH_A_CLOCK:
                offending.append(f"{name} imports {target}")
    assert offending == []
