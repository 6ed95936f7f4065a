"""README.md stays true where a test can tell: its length, the line counts of the reading path
and of the machinery, and the files it links to.

Oracles: the files themselves (their line counts as `wc -l` counts them, their existence).
"""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def counted_files():
    """{file: lines} as the README states them: table rows `| `data.py` | 338 |` and prose
    `` `common.py` (254 lines``."""
    rows = re.findall(r"\| `([\w/]+\.py)` \| (\d+) \|", README)
    prose = re.findall(r"`([\w/]+\.py)` \((\d+)(?: lines)?[:,)]", README)
    return {name: int(n) for name, n in rows + prose}


def test_the_readme_is_a_learners_document_of_at_most_300_lines():
    assert len(README.splitlines()) <= 300


def test_the_reading_path_states_the_line_count_of_every_file_of_the_top_level():
    counts = counted_files()
    assert set(counts) >= {p.name for p in ROOT.glob("*.py")}, "a top-level file is not counted"
    wrong = {name: (said, len((ROOT / name).read_text().splitlines()))
             for name, said in counts.items()
             if said != len((ROOT / name).read_text().splitlines())}
    assert wrong == {}, "README line counts (said, actual): update the reading path"


def test_every_relative_link_points_to_a_file_of_the_repository():
    links = re.findall(r"\]\(((?!https?:)[^)#]+)", README)
    assert links, "the README links to its docs"
    assert [link for link in links if not (ROOT / link).exists()] == []


def lines(path):
    return len(path.read_text().splitlines())


def test_the_machinery_line_count_is_the_sum_of_its_files():
    said = re.search(r"`machinery/` \(([\d,]+) lines", README)
    assert said, "the README states the machinery's size"
    total = sum(lines(p) for p in (ROOT / "machinery").glob("*.py"))
    assert int(said.group(1).replace(",", "")) == total


def test_the_reading_path_runs_method_lora_llama_data_train_sample_eval():
    rows = re.findall(r"^\| (\d) \| (.+?) \|", README, flags=re.M)
    assert [name for _, name in rows] == ['"The method", above', "`lora.py`", "`llama.py`",
                                          "`data.py`", "`train.py`", "`sample.py`", "`eval.py`"]
    assert README.index("## The method") < README.index("## Read the code")
