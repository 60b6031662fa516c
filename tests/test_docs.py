"""The code of README.md and docs/*.md runs: every ```python block of a page, in order, in
one fresh interpreter (a page's blocks share their names), in a scratch folder."""

import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def python_blocks(text):
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.mark.parametrize("page", PAGES)
def test_the_code_of_the_page_runs(page, tmp_path):
    blocks = python_blocks(open(os.path.join(ROOT, page)).read())
    if not blocks:
        pytest.skip(f"{page} has no python block")
    script = tmp_path / "page.py"
    script.write_text("\n\n".join(blocks))
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, f"{page}:\n{proc.stderr[-3000:]}"


def test_the_readme_stays_short_and_keeps_its_two_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    assert len(text.splitlines()) <= 250
    assert re.search(r"^\./run\.sh demo$", text, re.M) and re.search(r"^\./run\.sh test$", text, re.M)
    for link in re.findall(r"\]\((docs/[^)]+)\)", text):
        path, _, anchor = link.partition("#")
        assert os.path.isfile(os.path.join(ROOT, path)), link
        if anchor:  # (a heading of that page, as GitHub makes its anchor)
            headings = re.findall(r"^#+ (.*)$", open(os.path.join(ROOT, path)).read(), re.M)
            assert anchor in [re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings], link


def test_the_benchmark_tables_are_what_the_results_give():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "tables.py"), "--docs", "--check"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, "docs/benchmarks.md is behind bench/results/: run python bench/tables.py --docs"
