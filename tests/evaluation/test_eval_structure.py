"""The shape of the evaluation code, checked on its syntax trees: small modules and functions, benchmark
decisions only in the benchmark's own module, one answer loop, and a library that does not import
the evaluation package."""
import ast
from pathlib import Path

import pytest

from evaluation.tasks import BENCHMARKS

ROOT = Path(__file__).resolve().parents[2]
EVALUATION = ROOT / "evaluation"
LIBRARY = ROOT / "llava_san"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def _modules(folder):
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _tree(path):
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _rel(path):
    return str(path.relative_to(ROOT))


def _own_module(path):
    """The benchmark a module belongs to (``evaluation/tasks/<name>.py``), else None."""
    if path.parent == EVALUATION / "tasks" and path.stem in BENCHMARKS:
        return path.stem
    return None


def _benchmark_literals(node):
    """Benchmark names written as string constants in ``node`` (a constant, or a tuple/list/set of them)."""
    if isinstance(node, ast.Constant) and node.value in BENCHMARKS:
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in BENCHMARKS}
    return set()


def test_no_module_over_500_lines():
    long = {_rel(p): n for p in _modules(EVALUATION)
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_over_60_lines():
    long = {}
    for path in _modules(EVALUATION):
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{_rel(path)}:{node.lineno} {node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_benchmark_name_checks_outside_the_benchmark_module():
    """``name == "pope"``, ``name in ("vqav2", "vizwiz")``, ``match name: case "gqa"``: a decision
    about one benchmark belongs to its Task (evaluation/tasks/<name>.py), asked through the registry."""
    found = []
    for path in _modules(EVALUATION):
        own = _own_module(path)
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Compare):
                names = set().union(*(_benchmark_literals(x) for x in [node.left, *node.comparators]))
            elif isinstance(node, ast.MatchValue):
                names = _benchmark_literals(node.value)
            else:
                continue
            if names - {own}:
                found.append(f"{_rel(path)}:{node.lineno} {sorted(names)}")
    assert not found, f"benchmark-specific checks outside their module: {found}"


def test_benchmark_names_are_written_only_in_the_registry_and_their_module():
    """No list of benchmark names outside the registry (such as a tuple of the benchmarks that share
    some property): the property belongs to each Task. The SAN study (``evaluation/study``) names the benchmarks it
    runs as data and is not covered."""
    found = []
    for path in _modules(EVALUATION):
        if path == EVALUATION / "tasks" / "__init__.py" or "study" in path.relative_to(EVALUATION).parts:
            continue
        own = _own_module(path)
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Constant) and node.value in BENCHMARKS and node.value != own:
                found.append(f"{_rel(path)}:{node.lineno} {node.value!r}")
    assert not found, f"benchmark names outside the registry: {found}"


def _imported_modules(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)):
            yield str(node.args[0].value)


def test_library_does_not_import_evaluation():
    found = [f"{_rel(p)}: {m}" for p in _modules(LIBRARY) for m in _imported_modules(_tree(p))
             if m == "evaluation" or m.startswith("evaluation.")]
    assert not found, f"llava_san imports the evaluation package: {found}"


def _calls(path, name):
    return [n for n in ast.walk(_tree(path)) if isinstance(n, ast.Call)
            and getattr(n.func, "attr", getattr(n.func, "id", None)) == name]


@pytest.mark.parametrize("caller", ["evaluation/generate.py", "llava_san/training/easyvqa_eval.py"])
def test_one_answer_loop(caller):
    """`python -m evaluation` and the in-training easy-vqa check answer through the same loop, and
    only that loop calls the batch generator."""
    assert _calls(ROOT / caller, "answer_questions"), f"{caller} does not call answer_questions"
    direct = [_rel(p) for p in [*_modules(EVALUATION), *_modules(LIBRARY)]
              if p != LIBRARY / "generation.py" and _calls(p, "generate_batch")]
    assert not direct, f"generate_batch called outside llava_san/generation.py: {direct}"
