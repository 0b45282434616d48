"""The package's shape: rooms in layers, no import cycles, production code never imports tests.

Every distconv module belongs to a room (the longest prefix in ``RANKS``). A module may import
modules of its own room, or of a room of lower rank: no arrow runs from a lower room back up,
and rooms of one rank do not import each other. Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "distconv"

RANKS = {
    "distconv.errors": 0,
    "distconv.spec": 1,
    "distconv.hf.fp8": 2,  # the block-wise FP8 format's tensor math, which families quantize with
    "distconv.hf.mxfp4": 2,  # the MXFP4 format's tensor math, likewise
    "distconv.families": 3,
    "distconv.engine": 3,  # direction-agnostic: no format room, no family
    "distconv.vllm": 3,  # vLLM's side of a weight update, and the trainer's sender: no format, no family
    "distconv.megatron": 4,
    "distconv.hf": 4,
    "distconv.mindspore": 5,  # an HF-named source: reads with hf.source, describes with Megatron-LM args
    "distconv.directions": 6,
    "distconv.verify": 7,
    "distconv.inspect": 7,
    "distconv.watch": 7,
    "distconv": 7,  # the package: the Python API
    "distconv.cli": 8,
    "distconv.__main__": 9,
}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path) -> set[str]:
    """Every module name ``path`` imports anywhere (lazy imports too), with ``from X import Y`` as X and X.Y."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def _imports() -> dict[str, set[str]]:
    """Every distconv module and the distconv modules it imports."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {t for t in _imported(path) if t in modules and t != name} for name, path in modules.items()}


def _room(module: str) -> str:
    return max((r for r in RANKS if module == r or module.startswith(r + ".")), key=len)


def _upward(graph: dict[str, set[str]]) -> list[str]:
    """The imports that break the layering: into another room of the same or a higher rank."""
    return sorted(f"{m} -> {t}" for m, ts in graph.items() for t in ts
                  if _room(m) != _room(t) and RANKS[_room(t)] >= RANKS[_room(m)])


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                out.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checkers_find_a_cycle_and_an_upward_import():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = {"distconv.engine.run": {"distconv.megatron.checkpoint", "distconv.errors"},
             "distconv.megatron.checkpoint": {"distconv.engine.plan", "distconv.megatron.legacy"},
             "distconv.hf.source": {"distconv.megatron.checkpoint"}, "distconv.families.base": {"distconv.hf.fp8"},
             "distconv.hf.fp8": {"distconv.hf.source"}}
    assert _upward(graph) == ["distconv.engine.run -> distconv.megatron.checkpoint",
                              "distconv.hf.fp8 -> distconv.hf.source", "distconv.hf.source -> distconv.megatron.checkpoint"]


def test_no_import_cycles():
    # a package's __init__ gathering its own modules is not a cycle between places
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in _imports().items()}
    assert _cycles(graph) == []


def test_rooms_import_only_their_own_or_lower_rooms():
    assert _upward(_imports()) == []


def test_the_engine_imports_no_format_room_and_no_family():
    graph = _imports()
    engine = {m: ts for m, ts in graph.items() if m.startswith("distconv.engine")}
    assert engine and all(t.startswith(("distconv.engine", "distconv.errors", "distconv.spec"))
                          for ts in engine.values() for t in ts), engine


def test_production_modules_never_import_tests():
    tests = ROOT / "tests"
    names = {"tests"} | {p.stem for p in tests.glob("*.py")} | {p.name for p in tests.iterdir() if p.is_dir()}
    bad = sorted(f"{_module(p)} -> {name}" for p in PACKAGE.rglob("*.py") for name in _imported(p)
                 if name.split(".")[0] in names)
    assert bad == []


def test_the_command_line_help_imports_no_heavy_library():
    """``distconv --help`` (and each command's) answers without torch, megatron-core or transformers."""
    import subprocess
    import sys

    code = ("import sys\nfrom distconv.cli import main\n"
            "for argv in (['--help'], ['export', '--help'], ['import', '--help'], ['reshard', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'megatron', 'transformers'}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-500:]


def test_the_families_and_directions_import_neither_transformers_nor_megatron_core():
    """The family tables name their config classes; transformers and megatron-core are imported by
    the steps that need them, not by importing the families or a direction."""
    import subprocess
    import sys

    code = ("import sys\nimport distconv.families, distconv.directions.export, distconv.directions.import_, "
            "distconv.directions.reshard\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'megatron', 'transformers'}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-500:]
