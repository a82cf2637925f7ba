"""Writes chatglm_6b/*.py beside a checkpoint (transformers' remote code), each under a header naming its
source: run it after changing chatglm_6b/ to refresh the shipped demo checkpoint.

    python tools/copy_model_code.py              # demo_model/
    python tools/copy_model_code.py DIR
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from runtime.loading import DEMO_MODEL_PATH  # noqa: E402
from runtime.saving import copy_model_code  # noqa: E402

if __name__ == "__main__":
    copy_model_code(sys.argv[1] if len(sys.argv) > 1 else DEMO_MODEL_PATH)
