"""The READMEs tell the truth about the tree: every local link and image exists, and every fenced block
marked runnable (an HTML comment `<!-- runnable -->` on the line before it, invisible when rendered) runs
as written from the repository root."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

READMES = ["README.md", "README_en.md", "ptuning/README.md", "ptuning/README_en.md"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
RUNNABLE = re.compile(r"^<!-- runnable -->\n```(bash|python)\n(.*?)^```$", re.M | re.S)


def read(readme):
    with open(os.path.join(ROOT, readme), encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("readme", READMES)
def test_local_links_exist(readme):
    targets = LINK.findall(read(readme))
    local = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+://|mailto:|#", t)]
    missing = [t for t in local if t and not os.path.exists(os.path.join(ROOT, os.path.dirname(readme), t))]
    assert not missing, f"{readme} links to missing paths: {missing}"


def runnable_blocks():
    blocks = []
    for readme in ("README.md", "README_en.md"):
        found = RUNNABLE.findall(read(readme))
        assert found, f"{readme} marks no block runnable"
        blocks += [pytest.param(language, code, id=f"{readme}-{i}") for i, (language, code) in enumerate(found)]
    return blocks


@pytest.mark.parametrize("language,code", runnable_blocks())
def test_runnable_blocks_run(language, code):
    command = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    result = subprocess.run(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert result.stdout.strip(), "the block printed nothing"


LAYOUT = {"README.md": "## 仓库结构", "README_en.md": "## Repository layout"}


@pytest.mark.parametrize("readme", sorted(LAYOUT))
def test_repository_layout_matches_the_tree(readme):
    """Every path the layout names exists; every top-level entry of the tree, and every module of the
    packages it lists file by file, is named."""
    section = read(readme).split(LAYOUT[readme], 1)[1]
    block = re.search(r"```text\n(.*?)```", section, re.S).group(1)
    named, folder = set(), ""
    for line in block.splitlines():
        paths = line.strip().split("  ")[0].split()  # the path column ends at the first double space
        if not line.startswith(" "):
            folder = paths[0] if paths[0].endswith("/") else ""
            named.update(paths)
        else:
            named.update(folder + path for path in paths)
    missing = sorted(path for path in named if not os.path.exists(os.path.join(ROOT, path)))
    assert not missing, f"{readme} names paths that do not exist: {missing}"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    top = {path.split("/")[0] + ("/" if "/" in path else "") for path in tracked if path != ".gitignore"}
    assert not top - named, f"{readme} does not name {sorted(top - named)}"
    for package in ("chatglm_6b/", "runtime/"):
        modules = {package + name for name in os.listdir(os.path.join(ROOT, package))
                   if name.endswith(".py") and name != "__init__.py"}
        assert not modules - named, f"{readme} does not name {sorted(modules - named)}"
