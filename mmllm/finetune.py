"""Fine-tuning: the YAML's ``task`` picks the recipe (``mmllm.recipes``), which trains and writes a model folder.

    python -m mmllm.finetune --config finetune/tiny_cpu.yaml [key.sub=value ...]
    accelerate launch -m mmllm.finetune --config finetune/qwen2_5_vl_3b_lora.yaml
    python -m mmllm.finetune merge MODEL_DIR OUT_DIR        # adapter folded into a full model
    python -m mmllm.finetune --config X --print-config      # every knob of X's recipe, with its help

Tasks: ``generate`` (the default: LoRA / QLoRA, the model answers label JSON), ``classify`` (LoRA +
softmax heads on the pooled prompt state) and ``fusion`` (pretrained encoders + attribute network,
fused, softmax heads). Each recipe's config holds only the keys it reads, so a key of another
recipe (``lora.rank`` in a fusion config) stops the run with the key, the file and the closest
known key. Unusable inputs (missing or empty catalogs, a non-empty output folder) stop the run
before anything is built or written: exit status 2 and one line naming the config key and file.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import yaml

from mmllm import model_dir
from mmllm.config import ConfigError, apply_overrides, describe, load_config, load_yaml
from mmllm.recipes import classify, fusion, generate
from mmllm.recipes.classify import ClassifyRecipeConfig
from mmllm.recipes.common import InputError, release as release_output_dir
from mmllm.recipes.fusion import FusionRecipeConfig
from mmllm.recipes.generate import GenerateConfig
from mmllm.training import NonFiniteLoss, ResumeError, latest_checkpoint

# task -> (the recipe's config, the recipe)
RECIPES: dict[str, tuple[type, Callable[[Any], dict[str, Any]]]] = {
    "generate": (GenerateConfig, generate.run),
    "classify": (ClassifyRecipeConfig, classify.run),
    "fusion": (FusionRecipeConfig, fusion.run),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "merge":
        return _merge_cli(argv[1:])
    args = _parser().parse_args(argv)
    try:
        cfg = load_recipe_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        for key, help_text, default in describe(type(cfg)):
            print(f"{key:<32} {help_text}  [default: {default}]")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # peft calls a transformers method that transformers 5 deprecates; harmless, and noisy
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        result = finetune(cfg)
    except (InputError, ResumeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLoss as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside the training loop (which saves a checkpoint on Ctrl-C itself)
        print(f"interrupted: {_how_to_go_on(Path(cfg.train.output_dir))}", file=sys.stderr)
        return 130
    return 130 if result["interrupted"] else 0


def _how_to_go_on(out_dir: Path) -> str:
    """What the user runs next after a Ctrl-C outside the training steps, by what the folder holds."""
    last = latest_checkpoint(out_dir / "checkpoints")
    if last is None:  # stopped while it read, encoded or tuned: a rerun starts again there (recipes.common.never_saved)
        return (f"{out_dir} holds no checkpoint yet; rerun the same command to start again"
                + (" (the features cached there are read again)" if (out_dir / "feature_cache").is_dir() else ""))
    unfinished = not model_dir.is_model_dir(out_dir) or (out_dir / model_dir.UNFINISHED_FILE).exists()
    return ((f"{out_dir} is not a finished model folder; " if unfinished else "")
            + f"rerun the same command with train.resume=true to go on from its last checkpoint ({last.name})")


def load_recipe_config(path: str | Path | None, overrides: Iterable[str] = ()) -> Any:
    """The config of the recipe that the YAML's ``task`` (or a ``task=`` override) names, default
    ``generate``: a ``GenerateConfig``, ``ClassifyRecipeConfig`` or ``FusionRecipeConfig``."""
    overrides = list(overrides)
    return load_config(RECIPES[_task(path, overrides)][0], path, overrides)


def finetune(cfg: Any) -> dict[str, Any]:
    """Run the recipe of ``cfg``'s type; returns its summary (also written into the model folder).

    Raises :class:`~mmllm.recipes.common.InputError` (naming the config key and the file) before
    building anything or touching the output folder when an input is unusable.
    """
    for config_class, run in RECIPES.values():
        if isinstance(cfg, config_class):
            try:
                return run(cfg)
            finally:  # a failed or stopped run lets go of its folder's lock (in-process: a notebook goes on)
                release_output_dir(Path(cfg.train.output_dir))
    raise TypeError(f"{type(cfg).__name__} is not a recipe config; build one with load_recipe_config")


def _task(path: str | Path | None, overrides: list[str]) -> str:
    data: Any = {}
    if path is not None:
        try:
            data = load_yaml(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            data = {}  # load_config reports it, naming the file
    task = apply_overrides(data if isinstance(data, dict) else {}, overrides).get("task", "generate")
    if not isinstance(task, str) or task not in RECIPES:
        raise ConfigError(f"{path if path is not None else '<defaults>'}: 'task' must be one of {list(RECIPES)}, "
                          f"got {task!r}")
    return task


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mmllm.finetune", description=__doc__.split("\n\n")[0],
                                epilog="Overrides are key.sub=value, e.g. train.lr=1e-4 lora.rank=8. "
                                       "Merge an adapter: python -m mmllm.finetune merge MODEL_DIR OUT_DIR")
    p.add_argument("--config", type=Path, help="training YAML (see finetune/); its task picks the recipe")
    p.add_argument("--print-config", action="store_true",
                   help="list every config key of the config's recipe with its help and default")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return p


def _merge_cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m mmllm.finetune merge", description="write a merged full model")
    p.add_argument("model_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    args = p.parse_args(argv)
    from mmllm.tiny import resolve

    try:
        out = model_dir.merge(args.model_dir, args.out_dir, resolve=resolve)
    except (OSError, ValueError) as exc:  # not a LoRA folder, a damaged one, an OUT_DIR that is not new
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"merged model written to {out}")
    return 0


if __name__ == "__main__":
    from mmllm import interrupt

    interrupt.run(main)
