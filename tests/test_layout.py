"""The layout shows the architecture: the lesson at the top level, the tool's machinery in one
package beside it, every optional chapter in a folder of its own, imports running one way.

Oracles: Python's own parser (ast) reading every file's import statements; the folder listing;
sys.modules of a real one-step train.py run in a fresh interpreter.
"""
import ast
import json
from pathlib import Path

from tiny_run import run_script, tiny_model, train_args, write_quotes

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = {"lora", "llama", "data"}  # the adapter, the model, the samples: the lesson's library
SCRIPTS = {"train", "sample", "eval"}  # the lesson's commands; nothing imports them
LESSON = LIBRARY | SCRIPTS
MACHINERY = "machinery"  # the tool's machinery: one package, a module a node
CHAPTERS = {"speed", "export", "anatomy", "bench", "gpu_check", "qlora"}  # folders, each optional


def is_main_block(node):
    return isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)


def module_names(node):
    """The modules an import statement names: 'machinery.cli' for `from machinery import cli`
    and for `import machinery.cli`, 'lora' for `import lora`, 'speed' for `from speed import x`."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names}
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        if node.module == MACHINERY:
            return {f"{MACHINERY}.{a.name}" for a in node.names}
        return {node.module}
    return set()


def node_of(name):
    """The graph's node of a module: machinery.x itself, a chapter's folder, a top-level file."""
    head = name.split(".")[0]
    if head == MACHINERY:
        return ".".join(name.split(".")[:2])
    return head


def imports(node, lazy=True, main_block=False):
    """Project nodes that node and its children import. lazy=False: only module-level imports,
    not those inside functions. The `if __name__ == "__main__":` block is left out unless
    main_block."""
    if is_main_block(node) and not main_block:
        return set()
    if not lazy and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return set()
    names = {node_of(n) for n in module_names(node)}
    for child in ast.iter_child_nodes(node):
        names |= imports(child, lazy, main_block)
    return {n for n in names if n in LESSON | CHAPTERS or n.startswith(MACHINERY + ".")}


def files():
    """{node: [paths]}: the top-level files, each module of machinery/, and every file of the
    chapter folders (named by their folder)."""
    found = {p.stem: [p] for p in ROOT.glob("*.py")}
    for p in (ROOT / MACHINERY).glob("*.py"):
        found[f"{MACHINERY}.{p.stem}"] = [p]
    for folder in CHAPTERS:
        found[folder] = sorted((ROOT / folder).glob("*.py"))
    return found


def graph(lazy=True, main_block=False):
    """{node: project nodes it imports}."""
    return {name: set().union(*(imports(ast.parse(p.read_text()), lazy, main_block)
                                for p in paths)) - {name}
            for name, paths in files().items()}


def test_the_top_level_holds_the_lesson_and_the_folders_say_what_they_hold():
    assert {p.stem for p in ROOT.glob("*.py")} == LESSON
    for folder in CHAPTERS | {MACHINERY}:
        assert (ROOT / folder / "__init__.py").is_file(), f"{folder}/ says what it holds"
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders == CHAPTERS | {MACHINERY}


def test_lora_py_imports_no_project_file_not_even_in_its_main_block():
    tree = ast.parse((ROOT / "lora.py").read_text())
    assert imports(tree, main_block=True) == set()


def test_the_library_lesson_files_import_only_each_other_and_the_machinery():
    g = graph(main_block=True)
    for name in LIBRARY:
        outside = {n for n in g[name] if n not in LIBRARY and not n.startswith(MACHINERY)}
        assert outside == set(), f"{name}.py imports {outside}"
    assert g["llama"] <= {f"{MACHINERY}.hub", f"{MACHINERY}.model_files"}


def test_the_machinery_imports_the_library_and_itself_never_a_script():
    g = graph(main_block=True)
    for name, deps in g.items():
        if name.startswith(MACHINERY + "."):
            assert not deps & SCRIPTS, f"{name} imports {deps & SCRIPTS}"


def test_the_machinery_and_the_scripts_import_a_chapter_only_inside_a_function():
    """A chapter is imported when a flag asks for it (--kernels, --quantize, a PEFT folder),
    never by importing a lesson file or the machinery."""
    eager = graph(lazy=False, main_block=True)
    for name, deps in eager.items():
        if name in SCRIPTS or name.startswith(MACHINERY + "."):
            assert not deps & CHAPTERS, f"{name} imports {deps & CHAPTERS} at once"


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
    tree = ast.parse("import torch\nfrom machinery import cli\ndef f():\n    import lora\n"
                     "    from speed import kernels\nif __name__ == '__main__':\n"
                     "    import export\n")
    assert imports(tree) == {"machinery.cli", "lora", "speed"}
    assert imports(tree, lazy=False) == {"machinery.cli"}
    assert imports(tree, main_block=True) == {"machinery.cli", "lora", "speed", "export"}


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
