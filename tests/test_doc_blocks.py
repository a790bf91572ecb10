"""Every code block of README.md and docs/*.md runs as written, and the README's tables match the code.

* A python block runs as a script in a fresh process, in a fresh folder, with no workaround applied: the test
  environment has no torchvision, so transformers and Lightning import as a user's would. The only setting the
  test adds is ``SIMIGRAD_COMPILER=aot_eager``, which the README names as running the same passes without
  Inductor's code generation (a first Inductor compile costs 20 s+ on a 2-core CPU).
* A python block whose first line is ``# NAME.py`` is a file: it is written to that name in the folder of the
  bash block that follows it, which runs it.
* A bash block runs in that folder, with this environment's ``python`` first on ``PATH``, unless every line of it
  is an install or launch command of :data:`LISTED` (they create environments, download, or run for minutes to
  hours); such a block is checked for syntax (``bash -n``) and every repository file it names must exist (for an
  output file, its folder).
* A block that prints ``batch per step: [...]`` (the README's doors) must show the batch changing.
"""

import ast
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from simigrad_compile.config import SimigradConfig

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
FILE_BLOCK = re.compile(r"# ([\w-]+\.py)\b")

# Install and launch commands that the test checks instead of running, with the reason.
LISTED = {
    r"python3 -m venv \S+ && \S+/bin/pip install -r requirements/\w+\.txt -e \.( && .+)?": "creates an environment",
    r"(\S+/bin/)?pip install .+": "installs packages",
    r"(\w+=\S+ )*(\S+/bin/)?python bench/bench_\w+\.py.*": "a benchmark or the census: minutes to hours",
    r"(\S+/bin/)?pytest( .*)?": "the test suite runs itself",
    r"cd tests && torchrun .+ -m simigrad_testkit\.\w+.*": "a test worker's launch: tests/test_distributed.py runs it",
    r"SIMIGRAD_COMPILE_CACHE=\S+ torchrun .+": "a cluster launch of the reader's own train.py (8 ranks)",
    r"srun torchrun .+": "a SLURM launch: needs a cluster's scheduler",
    r"(\S+/bin/)?mkdocs build .+": "tests/test_docs_build.py builds the docs",
    r"bash requirements/refresh\.sh.*": "re-resolves the locks from the package index",
}
REPO_PATH = re.compile(r"(?<![\w/.-])((?:requirements|bench|tests|docs|simigrad_compile)/[\w./-]*\w)")


def blocks():
    """``(page, index, language, text, files)``: each runnable block, with the file blocks that precede it."""
    out = []
    for page in PAGES:
        files = {}
        for index, match in enumerate(FENCE.finditer(page.read_text())):
            language, text = match.group(1), match.group(2)
            name = FILE_BLOCK.match(text)
            if language == "python" and name:
                files[name.group(1)] = text
                continue
            out.append((page.relative_to(REPO).as_posix(), index, language, text, dict(files)))
    return out


BLOCKS = blocks()


def _id(block):
    page, index, language, text, _ = block
    return f"{page}:{index}:{language}:{text.strip().splitlines()[0][:40]}"


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIMIGRAD")}
    env.update(SIMIGRAD_COMPILER="aot_eager", HF_HUB_OFFLINE="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    return env


def _listed(line: str):
    return next((why for pattern, why in LISTED.items() if re.fullmatch(pattern, line)), None)


def _lines(text: str) -> list[str]:
    """A bash block's commands: comments stripped, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def _check_adapts(stdout: str):
    for line in stdout.splitlines():
        if line.startswith("batch per step:"):
            sizes = ast.literal_eval(line.split(":", 1)[1].strip())
            assert len(set(sizes)) > 2 and max(sizes) >= 2 * sizes[0], f"the batch does not visibly adapt: {line}"


def test_every_page_has_its_blocks_found():
    """The fence pattern finds what the pages hold (a stray fence would hide blocks from the test)."""
    for page in PAGES:
        text = page.read_text()
        assert text.count("```") == 2 * len(FENCE.findall(text)), page
    languages = {b[2] for b in BLOCKS}
    assert languages <= {"python", "bash"}, languages
    readme = [b for b in BLOCKS if b[0] == "README.md"]
    assert sum(1 for b in readme if b[2] == "python") == 3                 # the hand loop, Hugging Face, Lightning
    assert [b[4] for b in readme if "SIMIGRAD=1" in b[3]][0].keys() == {"train.py"}  # SIMIGRAD=1 runs train.py


@pytest.mark.parametrize("block", [pytest.param(b, id=_id(b), marks=[pytest.mark.slow] if "torchrun" in b[3] else [])
                                   for b in BLOCKS])
def test_block_runs_as_written(block, tmp_path):
    page, index, language, text, files = block
    for name, source in files.items():
        (tmp_path / name).write_text(source)
    if language == "python":
        (tmp_path / "block.py").write_text(text)
        command = [sys.executable, "block.py"]
    else:
        lines = _lines(text)
        listed = [line for line in lines if _listed(line)]
        if listed:
            assert len(listed) == len(lines), (f"{page} block {index} mixes listed install/launch commands with "
                                               f"others; split it: {[l for l in lines if not _listed(l)]}")
            subprocess.run(["bash", "-n", "-c", text], check=True)
            for path in REPO_PATH.findall(text):  # an input exists; an output's folder exists
                assert (REPO / path).exists() or (REPO / path).parent.is_dir(), f"{page} block {index}: no {path}"
            return
        command = ["bash", "-e", "-c", text]
    out = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, f"{page} block {index} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    _check_adapts(out.stdout)
    if language == "bash" and "SIMIGRAD=1" in text:  # the line on stderr and the files the README promises
        line = [l for l in out.stderr.splitlines() if l.startswith("simigrad: SIMIGRAD=1 adapts")]
        assert len(line) == 1 and "simigrad.csv" in line[0], out.stderr[-3000:]
        assert (tmp_path / "simigrad-log" / "simigrad.png").read_bytes().startswith(b"\x89PNG")


# --- the README's table of options ------------------------------------------------------------------------------
def _options_table() -> dict:
    text = (REPO / "README.md").read_text()
    table = text.split("<!-- options-table:start -->")[1].split("<!-- options-table:end -->")[0]
    rows = [r.split("|")[1:3] for r in table.strip().splitlines()[2:]]
    return {name.strip().strip("`"): default.strip().strip("`") for name, default in rows}


def test_readme_options_table_matches_the_config():
    """Every field of SimigradConfig once, with its default as Python writes it."""
    table = _options_table()
    defaults = {f.name: repr(f.default) for f in dataclasses.fields(SimigradConfig)}
    assert sorted(table) == sorted(defaults), "README options table: add or remove rows to match config.py"
    wrong = {k: (table[k], defaults[k]) for k in defaults if table[k] != defaults[k]}
    assert not wrong, f"README options table defaults differ from config.py (README, code): {wrong}"


@pytest.mark.parametrize("script", ["bench_census_table.py", "bench_census_symbolic_table.py"])
def test_census_table_matches_the_json(script):
    out = subprocess.run([sys.executable, str(REPO / "bench" / script), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_readme_cites_nothing_outside_the_repository():
    text = (REPO / "README.md").read_text()
    assert "DESIGN.md" not in text and "../shared" not in text
    for target in re.findall(r"\]\(([^)#]+)", text):
        assert target.startswith("http") or (REPO / target).exists(), target
