"""``python -m mmllm`` is the ``mmllm`` command."""

from mmllm.cli import main
from mmllm.interrupt import run

run(main)
