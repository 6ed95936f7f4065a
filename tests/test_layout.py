"""The reading order holds: imports point one way, from the scripts down to the model.

Oracle: Python's own parser (ast) reading every top-level file's import statements."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCAL = {p.stem for p in ROOT.glob("*.py")}
SCRIPTS = {"train", "sample", "eval", "bench"}  # what users run; nothing imports them


def is_main_block(node):
    return isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)


def imported(node):
    """Project modules that node and its children import, lazy imports included, the
    `if __name__ == "__main__":` block left out (it runs only as a command)."""
    if is_main_block(node):
        return set()
    names = set()
    if isinstance(node, ast.Import):
        names = {a.name.split(".")[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names = {node.module.split(".")[0]}
    for child in ast.iter_child_nodes(node):
        names |= imported(child)
    return names & LOCAL


def graph():
    return {name: imported(ast.parse((ROOT / f"{name}.py").read_text())) - {name}
            for name in LOCAL}


def test_the_core_imports_no_chapter_and_no_script():
    g = graph()
    assert g["lora"] == set()  # the idea needs only torch
    assert g["llama"] == {"hub"}  # the model, and where its files come from
    assert g["data"] <= {"hub", "llama"}
    assert g["generate"] == {"llama"}  # generation needs the model alone
    assert g["hub"] == set()


def test_no_file_imports_a_script():
    for name, deps in graph().items():
        assert not deps & SCRIPTS, f"{name}.py imports {deps & SCRIPTS}"


def test_no_import_cycle():
    g = graph()

    def reaches(start, goal, seen):
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n}))
                   for n in g[start])
    cycles = [name for name in g if reaches(name, name, {name})]
    assert cycles == []


def test_the_walk_sees_lazy_imports_and_skips_the_main_block():
    tree = ast.parse("import torch\ndef f():\n    import lora\n"
                     "if __name__ == '__main__':\n    import export\n")
    assert imported(tree) == {"lora"}
