"""The README and the docs site: short README, a site that builds without a broken link, examples that run."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def python_blocks(text: str) -> list:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_is_short_and_links_only_to_files_that_exist():
    lines = README.split("\n")
    assert len(lines) <= 150 and max(map(len, lines)) <= 130
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target
    assert "../shared" not in README and "make demo" in README and "make test" in README


def test_the_docs_site_builds_strictly(tmp_path):
    """``mkdocs build --strict``: a broken link or anchor, or a page missing from the nav, fails."""
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    if mkdocs is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[test]')")
    result = subprocess.run([mkdocs, "build", "--strict", "-q", "-d", str(tmp_path / "site")], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    nav = set(re.findall(r":\s*(\S+\.md)", (ROOT / "mkdocs.yml").read_text()))
    assert pages == nav


def test_the_readmes_quick_start_runs():
    """The quick start, with random weights for the download (and a one-block Vim-S)."""
    code = python_blocks(README)[0]
    code = code.replace('"vim_tiny_patch16_224", pretrained=True', '"vim_tiny_patch16_224"')
    code = code.replace('"vim_small_patch16_224", num_classes=10', '"vim_small_patch16_224", num_classes=10, depth=1')
    scope: dict = {}
    with torch.no_grad():
        exec(code, scope)
    assert scope["logits"].shape == (1, 1000) and scope["tokens"].shape == (1, 197, 192)
    assert [m.shape for m in scope["maps"]] == [(1, 192, 14, 14)] * 4 and scope["big"].shape == (1, 1000)


def docs_blocks() -> list:
    """(page, index, code) of every Python block in docs/ not marked ``<!-- not run: reason -->``."""
    found = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        text = page.read_text()
        for i, match in enumerate(re.finditer(r"(<!-- not run: [^>]+-->\n)?```python\n(.*?)```", text, flags=re.S)):
            if match.group(1) is None:
                found.append(pytest.param(match.group(2), id=f"{page.stem}-{i}"))
    return found


@pytest.mark.parametrize("code", docs_blocks())
def test_every_python_block_of_the_docs_runs(code):
    with torch.no_grad():
        exec(code, {})


def test_every_shell_block_says_why_it_is_not_run():
    """Shell blocks need data, weights, several machines or a GPU; each says so (and stays unchanged by accident)."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        blocks = len(re.findall(r"^```bash$", text, flags=re.M))
        marked = len(re.findall(r"^<!-- not run: [^>]+ -->\n```bash$", text, flags=re.M))
        assert blocks == marked, path


def test_the_docs_cite_the_specification_that_is_in_the_repository():
    for path in [*ROOT.joinpath("visionmamba").rglob("*.py"), *ROOT.joinpath("docs").glob("*.md")]:
        text = path.read_text()
        assert "vim-spec" not in text and "spec §" not in text, path
    sections = set(re.findall(r"^## (§\d)", (ROOT / "docs" / "specification.md").read_text(), flags=re.M))
    for path in ROOT.joinpath("visionmamba").rglob("*.py"):
        for cited in re.findall(r"specification\.md (§\d)", path.read_text()):
            assert cited in sections, (path, cited)


def command_lines() -> list:
    """Every ``visionmamba ...`` / ``torchrun ... -m visionmamba ...`` line of the README's and the docs' shell
    blocks, continuation lines joined, comments dropped."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#.*$", "", line.split(" > ")[0]).strip()
                words = line.split()
                if "visionmamba" in words[:1] or ("-m" in words and words[words.index("-m") + 1:][:1] == ["visionmamba"]):
                    start = words.index("visionmamba") + 1
                    found.append(pytest.param(words[start:], id=f"{path.stem}: {' '.join(words[start:start + 2])}"))
    return found


@pytest.mark.parametrize("argv", command_lines())
def test_every_documented_command_line_parses(argv):
    """The documented commands use flags that exist (a renamed flag breaks this, not a user's copy-paste)."""
    import shlex

    from visionmamba.cli import build_parser

    try:
        build_parser().parse_args(shlex.split(" ".join(argv)))
    except SystemExit as done:  # --help and --version end the parse with exit 0; a wrong flag with 2
        assert done.code == 0, argv


def test_the_readme_says_plainly_where_the_gpu_path_was_tested():
    """Until RESULTS.md holds figures measured on a GPU (benchmarks/gpu_check.py's table), the README says so."""
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    measured_on_a_gpu = re.search(r"^## .*gpu_check", results, flags=re.M | re.I)
    if not measured_on_a_gpu:
        assert "**The GPU path is not yet tested on a GPU**" in README and "interpreter" in README
