"""The training guide's fine-tuning commands and its Python loading example, run as written on a tiny model."""
import os
import re
import shlex
from pathlib import Path

import torch

import visionmamba
from helpers import TINY, cli, make_folder

GUIDE = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text().split("## Fine-tuning on your own classes")[1]


def test_the_fine_tuning_guide_runs_as_written(tmp_path):
    """Released weights -> own classes -> eval, predict, export, and the Python example; the stand-in for the
    released file is a 2-block Vim at 32 px, so the train line gets TINY's arguments and a short schedule."""
    data = make_folder(tmp_path / "mydata", classes=("cat", "dog"), per_class=3)
    torch.manual_seed(0)
    released = visionmamba.create_model("vim_tiny_patch16_224", depth=2, embed_dim=32, patch_size=8, stride=8, img_size=32)
    torch.save({"model": released.state_dict()}, tmp_path / "vim_t_midclstok_76p1acc.pth")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes((data / "val" / "cat" / "0.png").read_bytes())
    block = re.search(r"```bash\n(.*?)```", GUIDE, flags=re.S).group(1).replace("\\\n", " ")
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines() if line.strip()]
    assert [line.split()[1] for line in lines] == ["train", "eval", "predict", "export"]
    for line in lines:
        args = shlex.split(line)[1:]
        if args[0] == "train":
            args[args.index("--epochs") + 1], args[args.index("--batch-size") + 1] = "2", "3"
            args += [*TINY, "--workers", "0", "--no-progress"]
        if args[0] == "eval":
            args += ["--workers", "0", "--no-progress"]
        proc = cli(*args, cwd=tmp_path)
        if args[0] == "predict":
            assert {"cat", "dog"} <= set(proc.stdout.split())
    assert (tmp_path / "mine.onnx").stat().st_size > 0

    example = re.search(r"```python\n(.*?)```", GUIDE, flags=re.S).group(1)
    scope: dict = {}
    cwd = Path.cwd()
    try:
        os.chdir(tmp_path)
        with torch.no_grad():
            exec(example, scope)
    finally:
        os.chdir(cwd)
    assert scope["loaded"].labels == ["cat", "dog"] and len(scope["model"].layers) == 2
