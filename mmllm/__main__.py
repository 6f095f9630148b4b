"""``python -m mmllm`` is the ``mmllm`` command."""

import sys

from mmllm.cli import main

sys.exit(main())
