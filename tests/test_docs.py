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
