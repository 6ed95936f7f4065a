"""The layout shows the architecture: the lesson and the commands at the top level, every optional
chapter in a folder of its own, imports running one way.

Oracles: Python's own parser (ast) reading every file's import statements; the folder listing;
sys.modules of a real one-step train.py run in a fresh interpreter.
"""
import ast
import json
from pathlib import Path

from tiny_run import run_script, tiny_model, train_args, write_quotes

ROOT = Path(__file__).resolve().parent.parent
CORE = {"llama", "lora", "data"}  # the model, the adapter, the samples
HELPERS = {"common", "hub", "checkpoint"}  # what the scripts share: no lesson of their own
SCRIPTS = {"train", "sample", "eval"}  # what users run; nothing imports them
CHAPTERS = {"speed", "export", "anatomy", "bench", "gpu_check"}  # folders, each optional
TOP = CORE | HELPERS | SCRIPTS
PROJECT = TOP | CHAPTERS


def is_main_block(node):
    return isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)


def imports(node, lazy=True, main_block=False):
    """Project modules (top-level files and chapter folders) that node and its children import.
    lazy=False: only module-level imports, not those inside functions. The
    `if __name__ == "__main__":` block is left out unless main_block."""
    if is_main_block(node) and not main_block:
        return set()
    if not lazy and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return set()
    names = set()
    if isinstance(node, ast.Import):
        names = {a.name.split(".")[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names = {node.module.split(".")[0]}
    for child in ast.iter_child_nodes(node):
        names |= imports(child, lazy, main_block)
    return names & PROJECT


def files():
    """{module name: path}: the top-level files, and every file of the chapter folders (named by
    their folder)."""
    found = {p.stem: p for p in ROOT.glob("*.py")}
    for folder in CHAPTERS:
        for p in (ROOT / folder).glob("*.py"):
            found[f"{folder}/{p.name}"] = p
    return found


def graph(lazy=True, main_block=False):
    """{module: project modules it imports}; a chapter file counts as its folder."""
    g = {}
    for name, path in files().items():
        owner = name.split("/")[0]
        deps = imports(ast.parse(path.read_text()), lazy, main_block) - {owner}
        g[owner] = g.get(owner, set()) | deps
    return g


def test_the_top_level_holds_the_lesson_the_commands_and_three_helpers():
    assert {p.stem for p in ROOT.glob("*.py")} == TOP
    assert len(TOP) <= 9
    for folder in CHAPTERS:
        assert (ROOT / folder / "__init__.py").is_file(), f"{folder}/ says what it holds"


def test_lora_py_imports_no_project_file_not_even_in_its_main_block():
    tree = ast.parse((ROOT / "lora.py").read_text())
    assert imports(tree, main_block=True) == set()


def test_the_core_and_the_helpers_import_downward_only():
    g = graph()
    assert g["llama"] == {"hub"}  # the model, and where its files come from
    assert g["data"] <= {"hub", "llama"}
    assert g["hub"] == set()
    assert g["common"] <= CORE | {"hub"}
    assert g["checkpoint"] <= CORE | {"hub", "common"}


def test_no_core_file_or_helper_imports_a_chapter_even_lazily():
    g = graph(main_block=True)
    for name in CORE | HELPERS:
        assert not g[name] & CHAPTERS, f"{name}.py imports {g[name] & CHAPTERS}"


def test_the_scripts_import_a_chapter_only_inside_a_function_when_a_flag_asks():
    eager = graph(lazy=False, main_block=True)
    for name in SCRIPTS:
        assert not eager[name] & CHAPTERS, f"{name}.py imports {eager[name] & CHAPTERS} at once"


def test_no_file_imports_a_script():
    for name, deps in graph(main_block=True).items():
        assert not deps & SCRIPTS, f"{name} imports {deps & SCRIPTS}"


def test_no_import_cycle():
    g = graph()

    def reaches(start, goal, seen):
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n}))
                   for n in g.get(start, ()))
    assert [name for name in g if reaches(name, name, {name})] == []


def test_the_walk_sees_lazy_imports_and_skips_the_main_block():
    tree = ast.parse("import torch\ndef f():\n    import lora\n    from speed import kernels\n"
                     "if __name__ == '__main__':\n    import export\n")
    assert imports(tree) == {"lora", "speed"}
    assert imports(tree, lazy=False) == set()
    assert imports(tree, main_block=True) == {"lora", "speed", "export"}


PROBE = """
import json, runpy, sys
sys.argv = ["train.py"] + sys.argv[1:]
try:
    runpy.run_path("train.py", run_name="__main__")
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "modules": sorted(m for m in sys.modules
                                                  if m.split(".")[0] in %r)}))
"""


def test_a_default_training_run_imports_no_chapter(tmp_path_factory, tmp_path):
    """One step of `python train.py` as a user runs it: llama.py and lora.py train, and not one
    module of a chapter folder is even imported. With --kernels, the speed chapter is."""
    model = tiny_model(tmp_path_factory)
    quotes = write_quotes(tmp_path / "q.jsonl")
    for flag, expected in [((), []), (("--kernels",), ["speed", "speed.kernels"])]:
        argv = train_args(model, quotes, tmp_path / f"out{len(flag)}", "--max-steps", 1, *flag)
        done = run_script(["-c", PROBE % sorted(CHAPTERS), *argv])
        last = json.loads(done.stdout.strip().splitlines()[-1])
        assert last == {"code": 0, "modules": expected}, done.stderr
