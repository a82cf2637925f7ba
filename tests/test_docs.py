"""Every local link and image in the READMEs points to a file or folder of the repository."""
import os
import re

import pytest

from conftest import ROOT

READMES = ["README.md", "README_en.md", "ptuning/README.md", "ptuning/README_en.md"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("readme", READMES)
def test_local_links_exist(readme):
    with open(os.path.join(ROOT, readme), encoding="utf-8") as f:
        targets = LINK.findall(f.read())
    local = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+://|mailto:|#", t)]
    missing = [t for t in local if t and not os.path.exists(os.path.join(ROOT, os.path.dirname(readme), t))]
    assert not missing, f"{readme} links to missing paths: {missing}"
