"""Small labelled catalogs with drawn pictures, for the training and labelling tests."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

from mmllm.schema import LabelSchema

SMALL_SCHEMA = {
    "name": "small",
    "taxonomy": ["Games > Chess", "Games > Card Games", "Outdoor > Kites", "Vehicles > Cars"],
    "attributes": {
        "piece_count": {"type": "integer", "minimum": 1, "maximum": 1000, "description": "pieces in the box"},
        "material": {"type": "list", "values": ["wood", "plastic", "fabric"], "max_items": 2, "description": "materials"},
    },
}
COLOURS = ["red", "blue", "green", "orange", "purple", "black", "yellow", "teal"]


def small_schema() -> LabelSchema:
    return LabelSchema.from_dict(SMALL_SCHEMA)


def draw(path: Path, colour: str, shape: int) -> None:
    image = Image.new("RGB", (64, 48), "white")
    d = ImageDraw.Draw(image)
    box = [8, 8, 56, 40]
    (d.ellipse if shape % 2 else d.rectangle)(box, fill=colour)
    image.save(path)


def write_catalog(folder: Path, n: int = 12, text_only_every: int = 4) -> Path:
    """``n`` labelled listings; every ``text_only_every``-th has no image."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "img").mkdir(exist_ok=True)
    categories = SMALL_SCHEMA["taxonomy"]
    materials = [["wood"], ["plastic"], ["fabric"], ["wood", "plastic"]]
    rows = []
    for i in range(n):
        images = []
        if text_only_every and i % text_only_every != text_only_every - 1:
            draw(folder / "img" / f"{i}.png", COLOURS[i % len(COLOURS)], i)
            images = [f"img/{i}.png"]
        rows.append({
            "id": f"item-{i}",
            "title": f"{COLOURS[i % len(COLOURS)].title()} toy number {i}",
            "description": f"Listing {i}.",
            "attributes": {"Pieces": str(10 + i)},
            "images": images,
            "label": {"category": categories[i % len(categories)],
                      "attributes": {"piece_count": 10 + i, "material": materials[i % len(materials)]}},
        })
    path = folder / "catalog.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    LabelSchema.from_dict(SMALL_SCHEMA).to_yaml(folder / "schema.yaml")
    return path
