"""The Gradio demo's entry script: ``python demo/app.py --model MODEL_DIR_OR_ID [--index INDEX_DIR]``.

The demo itself is :mod:`mmllm.demo` (also ``mmllm demo``); this file only runs it from a checkout.
"""

import sys

from mmllm.demo import main

if __name__ == "__main__":
    sys.exit(main())
