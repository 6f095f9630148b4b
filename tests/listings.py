"""Small catalogs and dumps for the tests: one writer, :func:`write_catalog`, and the row makers it takes.

- :func:`toy_row` (the default): labelled toys under ``SMALL_SCHEMA``, drawn pictures, some text-only;
- :func:`dump_row`: unlabelled rows ``r0``, ``r1``, ... to label, optionally with pictures;
- :func:`colour_row`: listings under ``COLOUR_SCHEMA`` whose category needs the picture AND the title.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw

from mmllm.schema import LabelSchema

SMALL_SCHEMA = {
    "name": "small",
    "taxonomy": ["Games > Chess", "Games > Card Games", "Outdoor > Kites", "Vehicles > Cars"],
    "attributes": {
        "piece_count": {"type": "integer", "minimum": 1, "maximum": 1000, "description": "pieces in the box",
                        "evidence": {"table": ["Pieces"]}},  # the seller's "Pieces" states it (toy_row)
        "material": {"type": "list", "values": ["wood", "plastic", "fabric"], "max_items": 2, "description": "materials"},
    },
}
COLOUR_SCHEMA = {
    "name": "colours",
    "taxonomy": ["Red > Wooden", "Red > Plastic", "Blue > Wooden", "Blue > Plastic"],
    "attributes": {"batteries_required": {"type": "boolean", "description": "needs batteries"},
                   "piece_count": {"type": "integer", "minimum": 1, "maximum": 100, "description": "pieces"},
                   "material": {"type": "list", "values": ["wood", "plastic"], "description": "materials"}},
}
COLOURS = ["red", "blue", "green", "orange", "purple", "black", "yellow", "teal"]

Row = Callable[[Path, int], dict]
"""Makes listing number ``i`` as a dict, saving its pictures under ``folder/img``."""


def small_schema() -> LabelSchema:
    return LabelSchema.from_dict(SMALL_SCHEMA)


def write_catalog(folder: Path, n: int = 12, row: Row | None = None, *, name: str = "catalog.jsonl",
                  schema: dict = SMALL_SCHEMA, start: int = 0) -> Path:
    """Listings ``start`` .. ``start + n - 1`` made by ``row`` (default :func:`toy_row`) as ``folder/name``,
    and ``schema`` as ``folder/schema.yaml``. Returns the catalog's path."""
    folder.mkdir(parents=True, exist_ok=True)
    row = row or toy_row()
    rows = [row(folder, i) for i in range(start, start + n)]
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    LabelSchema.from_dict(schema).to_yaml(folder / "schema.yaml")
    return path


def picture(folder: Path, name: str, image: Image.Image) -> str:
    """Save ``image`` as ``folder/img/name``; the path a row gives for it."""
    (folder / "img").mkdir(exist_ok=True)
    image.save(folder / "img" / name)
    return f"img/{name}"


def toy_row(text_only_every: int = 4) -> Row:
    """Labelled toys ``item-0``, ``item-1``, ... in the four ``SMALL_SCHEMA`` categories in turn, each with
    a drawn rectangle or ellipse; every ``text_only_every``-th has no picture (0: none has one)."""
    categories = SMALL_SCHEMA["taxonomy"]
    materials = [["wood"], ["plastic"], ["fabric"], ["wood", "plastic"]]

    def row(folder: Path, i: int) -> dict:
        colour = COLOURS[i % len(COLOURS)]
        images = []
        if text_only_every and i % text_only_every != text_only_every - 1:
            image = Image.new("RGB", (64, 48), "white")
            d = ImageDraw.Draw(image)
            (d.ellipse if i % 2 else d.rectangle)([8, 8, 56, 40], fill=colour)
            images = [picture(folder, f"{i}.png", image)]
        return {
            "id": f"item-{i}",
            "title": f"{colour.title()} toy number {i}",
            "description": f"Listing {i}.",
            "attributes": {"Pieces": str(10 + i)},
            "images": images,
            "label": {"category": categories[i % len(categories)],
                      "attributes": {"piece_count": 10 + i, "material": materials[i % len(materials)]}},
        }

    return row


def dump_row(*, images: bool = False, wooden_every: int = 7, description: bool = True) -> Row:
    """Unlabelled rows ``r{i}`` titled ``Toy {i}`` plus ``i % wooden_every`` times "wooden" (titles of many
    lengths), with a description of ``i % 50`` characters; with ``images``, rows 0, 3, 6, ... have a picture."""

    def row(folder: Path, i: int) -> dict:
        out = {"id": f"r{i}", "title": f"Toy {i} " + "wooden " * (i % wooden_every)}
        if description:
            out["description"] = "d" * (i % 50)
        out["attributes"] = {"Pieces": str(i)}
        if images and i % 3 == 0:
            out["images"] = [picture(folder, f"{i}.png", Image.new("RGB", (40 + i % 20, 30), (i * 7 % 255, 80, 120)))]
        return out

    return row


def colour_row(seed: int) -> Row:
    """Listings ``{seed}-{i}`` under ``COLOUR_SCHEMA``, drawn at random from ``seed``: the category
    (``Red > Wooden`` ...) needs the picture's colour AND the title's word; neither alone decides it.
    It draws in row order: make a new one for each catalog."""
    rng = random.Random(seed)

    def row(folder: Path, i: int) -> dict:
        colour, word = rng.choice(["Red", "Blue"]), rng.choice(["Wooden", "Plastic"])
        pixel = (200 + rng.randint(-30, 30), 30, 30) if colour == "Red" else (30, 30, 200 + rng.randint(-30, 30))
        image = picture(folder, f"{seed}-{i}.png", Image.new("RGB", (56, 56), pixel))
        filler = rng.choice(["toy", "set", "gift", "kit"])
        return {"id": f"{seed}-{i}", "title": f"{word.lower()} {filler} {i}", "images": [image],
                "label": {"category": f"{colour} > {word}",
                          "attributes": {"material": [word.lower().replace("wooden", "wood")]}}}

    return row


def load_model_dir(folder, **options):
    """:func:`mmllm.model_dir.load` with ``tiny:`` base names resolved, as the command line does."""
    from mmllm import model_dir
    from mmllm.tiny import resolve

    return model_dir.load(folder, resolve=resolve, **options)
