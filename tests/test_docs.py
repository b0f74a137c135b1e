"""What the documents name exists: files and folders, `haplo-export` subcommands, training configs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from haplo.commands.main import build_parser
from haplo.training.config import TrainConfig
from haplo.training.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", "ARCHITECTURE.md", "CONTRIBUTING.md"]
TOP = ("haplo/", "export/", "engines/", "bench/", "tests/", "configs/", ".ci/", "docs/")
# Paths a document shows as outputs or user inputs, not as files of the repository.
MADE = ("bench/results/latest", "configs/train-mine.yaml")


def named_paths(text: str) -> set[str]:
    """Backticked repository paths: `haplo/model/ops.py`, `export/quantize/`, `configs/train.yaml`."""
    found = set()
    for quoted in re.findall(r"`([^`\s]+)`", text):
        path = quoted.split("::")[0].rstrip(".,:;)")
        if path.startswith(TOP) and not path.startswith(MADE) and "*" not in path and "NAME" not in path:
            found.add(path)
    return found


def commands(text: str, tool: str = "haplo-export") -> list[list[str]]:
    """`haplo-export ...` (or another `tool`'s) lines of the code blocks (continuations joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    found = []
    for line in lines:
        for part in line.split("&&"):
            if not part.strip().startswith(tool + " "):
                continue  # other tools' lines (curl with a JSON body) need not be shell words one by one
            words = shlex.split(part.split("#")[0])
            if words[:1] == [tool]:
                found.append(words[1:])
    return found


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_named_path_exists(document):
    text = (ROOT / document).read_text()
    missing = sorted(p for p in named_paths(text) if not (ROOT / p).exists())
    assert not missing, f"{document} names paths that do not exist: {missing}"


def test_every_readme_command_parses():
    parser = build_parser()
    found = commands((ROOT / "README.md").read_text())
    assert len(found) >= 8
    for argv in found:
        parser.parse_args(argv)  # SystemExit (and an `error:` line) on an unknown command or option


def test_every_readme_haplo_serve_command_parses():
    from haplo.commands.serve import build_parser as serve_parser

    found = commands((ROOT / "README.md").read_text(), "haplo-serve")
    assert len(found) >= 3
    for argv in found:
        serve_parser().parse_args(argv)


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_training_configs_load(config, tmp_path):
    """A stage config (`stage: N`) loads as a TrainConfig; a recipe (`stages:`) as a Recipe."""
    text = config.read_text()
    if re.search(r"^stages:", text, re.M):
        recipe = Recipe.from_yaml(config, output_dir=str(tmp_path / "run"))
        assert recipe.stage_configs()[0].output_dir.startswith(str(tmp_path))
        return
    stage = int(re.search(r"^stage: (\d)", text, re.M).group(1))
    assert TrainConfig.from_yaml(config, stage=stage).stage == stage


def test_the_checks_can_fail():
    assert named_paths("see `haplo/nowhere.py` and `export/`") == {"haplo/nowhere.py", "export/"}
    assert commands("```bash\nhaplo-export build --out b && haplo-export nope\n```") == [
        ["build", "--out", "b"],
        ["nope"],
    ]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["nope"])
