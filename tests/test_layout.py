"""The code's shape, checked: small modules, no import cycles, one home for each piece of shared plumbing.

These are the rules of ../shared/DESIGN.md that a reviewer would otherwise check by hand on every change.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("rag_ecg", "index", "training")
MAX_LINES = 500
# heavy optional dependencies that stay inside the branch that needs them (DESIGN.md)
OPTIONAL = {"ray", "vllm", "bitsandbytes", "openai", "pypdfium2"}


def _modules() -> dict[str, Path]:
    out = {}
    for top in CODE_DIRS:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(path: Path, modules: dict[str, Path], top_level_only: bool) -> set[str]:
    """Our own modules that `path` imports (at module level only, or anywhere)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in _modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules (one job each): {long}"


def test_there_is_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(path, modules, top_level_only=False) - {name} for name, path in modules.items()}
    # a package's __init__ is imported on the way to its submodules: not an edge back
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_library_never_imports_a_job():
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("rag_ecg"):
            jobs = {m for m in _imports(path, modules, top_level_only=False) if not m.startswith("rag_ecg")}
            assert not jobs, f"{path.relative_to(ROOT)} imports the job(s) {sorted(jobs)}"


def _sources() -> dict[Path, str]:
    return {p: p.read_text() for p in _modules().values()}


def test_one_atomic_write_one_config_loader_one_versions_collector():
    io_py, config_py = ROOT / "rag_ecg" / "io.py", ROOT / "rag_ecg" / "config.py"
    for path, text in _sources().items():
        rel = path.relative_to(ROOT)
        if path != io_py:
            assert "os.replace(" not in text and "os.rename(" not in text, f"{rel}: use rag_ecg.io (atomic_write…)"
            assert "mkstemp(" not in text, f"{rel}: use rag_ecg.io for temp files beside a target"
            assert not re.search(r"^def _?(current_)?versions\(", text, re.M), f"{rel}: use rag_ecg.io.versions"
        if path != config_py:
            assert "yaml.safe_load(" not in text, f"{rel}: load YAML configs with rag_ecg.config"


def test_every_error_has_one_root():
    from rag_ecg.errors import RagEcgError

    for path, text in _sources().items():
        for m in re.finditer(r"^class (\w+(Error|Exception))\((.*?)\):", text, re.M):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            cls = getattr(__import__(module, fromlist=[m.group(1)]), m.group(1))
            assert issubclass(cls, RagEcgError), f"{path.relative_to(ROOT)}: {m.group(1)} is not a RagEcgError"


def test_library_code_logs_instead_of_printing():
    for path, text in _sources().items():
        if path.parts[-2] == "rag_ecg" or "rag_ecg" in path.relative_to(ROOT).parts[:1]:
            assert not re.search(r"\blog\s*=\s*print\b", text), f"{path.relative_to(ROOT)}: use logging"
            assert not re.search(r"^\s*print\(", text, re.M), f"{path.relative_to(ROOT)}: use logging, not print"


# Imported inside the function that needs them, on purpose: optional extras (ray, vllm's client, bitsandbytes,
# pypdfium2 for PDFs), the LLM stack that only the hf/vllm readers and the LLM recipes use, and the backend
# modules that import those (so `import rag_ecg.reader.backends` stays light).
LAZY_OK = ("ray", "openai", "bitsandbytes", "pypdfium2", "transformers", "peft", "accelerate", "deepspeed",
           "rag_ecg.reader.hf", "rag_ecg.reader.vllm", "rag_ecg.review.ray_engine", "torch.distributed")


def test_imports_are_at_the_top_of_each_module():
    lazy = []
    for path in _modules().values():
        tree = ast.parse(path.read_text())
        top = set(map(id, tree.body))
        guarded = {id(n) for node in tree.body if isinstance(node, (ast.If, ast.Try)) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top and id(node) not in guarded:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if not any(n == ok or n.startswith(ok + ".") for n in names for ok in LAZY_OK):
                    lazy.append(f"{path.relative_to(ROOT)}:{node.lineno} {', '.join(names)}")
    assert not lazy, f"{len(lazy)} function-local imports (move them to the top): " + "; ".join(lazy[:20])
