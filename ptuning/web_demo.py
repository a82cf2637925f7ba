"""The original's ptuning/web_demo.py command line, `python3 web_demo.py --model_name_or_path THUDM/chatglm-6b
--ptuning_checkpoint output/.../checkpoint-3000 --pre_seq_len 128` run from ptuning/: the repository's
web demo (web_demo.py at the root), which takes these spellings of its options too."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from web_demo import main  # noqa: E402

if __name__ == "__main__":
    main()
