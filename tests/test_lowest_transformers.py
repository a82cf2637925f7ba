"""The model core on the lowest transformers release that requirements.txt allows, so that a rename in
transformers (5.24 renamed the generation cache) is caught in both directions. The newest release is what
the rest of the suite runs on. The second environment is a virtual environment that sees this one's
packages and adds only that transformers release (and what it pins differently), kept between runs."""
import os
import re
import shutil
import subprocess
import sys

import transformers

from conftest import ROOT

MODEL_CORE_TESTS = ["tests/test_model.py", "tests/test_generation.py", "tests/test_reference.py",
                    "tests/test_demo_model.py", "tests/test_quantization.py", "tests/test_quantization_kernels.py"]


def lowest_allowed(package: str) -> str:
    with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as f:
        for line in f:
            match = re.match(rf"{package}\s*>=\s*([\w.]+)", line.strip())
            if match:
                return match.group(1)
    raise AssertionError(f"requirements.txt gives no lower bound for {package}")


def environment_with(requirement: str) -> str:
    """The python of a cached virtual environment: this one's packages plus `requirement`."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    venv = os.path.join(cache, "chatglm-6b-tests", re.sub(r"[^\w.]+", "-", requirement))
    python = os.path.join(venv, "bin", "python")
    if not os.path.isfile(os.path.join(venv, "ready")):
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv], check=True)
        install = subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                                  requirement], capture_output=True, text=True)
        assert install.returncode == 0, f"pip install {requirement} failed:\n{install.stderr[-3000:]}"
        open(os.path.join(venv, "ready"), "w").close()
    return python


def test_model_core_on_the_lowest_allowed_transformers():
    lowest = lowest_allowed("transformers")
    assert transformers.__version__ != lowest, "this run already is the lowest release: nothing to compare"
    python = environment_with(f"transformers=={lowest}")
    version = subprocess.run([python, "-c", "import transformers; print(transformers.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == lowest
    result = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *MODEL_CORE_TESTS], cwd=ROOT,
                            capture_output=True, text=True, timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, f"model-core tests on transformers {lowest}:\n{result.stdout[-6000:]}"
