"""Draw the example listings' product pictures and write examples/drawn/catalog.jsonl.

The project ships no scraped photos: these pictures are drawn here with Pillow (flat shapes),
so they can be shipped under the project's own licence. The output is deterministic;
run `python examples/drawn/draw.py` to rebuild the folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SIZE = 320


def canvas(background: str = "#f4f1ea") -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (SIZE, SIZE), background)
    return image, ImageDraw.Draw(image)


def beach_ball() -> Image.Image:
    image, d = canvas("#bfe6ff")
    d.rectangle([0, 230, SIZE, SIZE], fill="#f2d27c")  # sand
    box = [70, 50, 250, 230]
    colours = ["#e63946", "#ffffff", "#1d70b8", "#ffffff", "#f4c20d", "#ffffff"]
    for i, colour in enumerate(colours):
        d.pieslice(box, start=i * 60, end=(i + 1) * 60, fill=colour, outline="#333333", width=2)
    d.ellipse([150, 130, 170, 150], fill="#ffffff", outline="#333333", width=2)
    return image


def stacking_blocks() -> Image.Image:
    image, d = canvas()
    colours = ["#e63946", "#2a9d8f", "#f4a261", "#457b9d", "#e9c46a", "#8ab17d"]
    for row in range(3):
        for col in range(3 - row):
            x = 60 + col * 70 + row * 35
            y = 230 - row * 70
            d.rectangle([x, y, x + 66, y + 66], fill=colours[(row * 3 + col) % 6], outline="#5a3e2b", width=3)
            d.text((x + 28, y + 24), "ABC"[(row + col) % 3], fill="#ffffff")
    return image


def toy_car(colour: str = "#d62828") -> Image.Image:
    image, d = canvas("#dfe7ec")
    d.rectangle([0, 250, SIZE, SIZE], fill="#6c757d")
    d.rounded_rectangle([50, 150, 270, 220], radius=18, fill=colour, outline="#222222", width=3)
    d.polygon([(100, 150), (130, 105), (210, 105), (240, 150)], fill=colour, outline="#222222")
    d.polygon([(115, 148), (138, 115), (165, 115), (165, 148)], fill="#a8dadc")
    d.polygon([(175, 148), (175, 115), (205, 115), (228, 148)], fill="#a8dadc")
    for cx in (100, 220):
        d.ellipse([cx - 28, 195, cx + 28, 251], fill="#222222")
        d.ellipse([cx - 12, 211, cx + 12, 235], fill="#adb5bd")
    return image


def kite() -> Image.Image:
    image, d = canvas("#9ad1f5")
    top, left, right, bottom, centre = (160, 30), (80, 140), (240, 140), (160, 260), (160, 140)
    d.polygon([top, left, centre], fill="#e63946")
    d.polygon([top, right, centre], fill="#f4c20d")
    d.polygon([left, bottom, centre], fill="#2a9d8f")
    d.polygon([right, bottom, centre], fill="#1d70b8")
    d.line([top, bottom], fill="#333333", width=2)
    d.line([left, right], fill="#333333", width=2)
    points = [(160 + 20 * math.sin(t / 6), 260 + t * 1.1) for t in range(0, 55)]
    d.line(points, fill="#333333", width=2)
    return image


def dice() -> Image.Image:
    image, d = canvas("#2d6a4f")
    pips = {1: [(0, 0)], 3: [(-1, -1), (0, 0), (1, 1)], 5: [(-1, -1), (1, -1), (0, 0), (-1, 1), (1, 1)]}
    for (x, y), face in zip([(50, 90), (185, 60), (120, 190)], [5, 3, 1]):
        d.rounded_rectangle([x, y, x + 90, y + 90], radius=14, fill="#fdfdfd", outline="#222222", width=3)
        for px, py in pips[face]:
            cx, cy = x + 45 + px * 25, y + 45 + py * 25
            d.ellipse([cx - 8, cy - 8, cx + 8, cy + 8], fill="#222222")
    return image


def jigsaw() -> Image.Image:
    image, d = canvas()
    colours = ["#264653", "#2a9d8f", "#e9c46a", "#f4a261", "#e76f51", "#8ab17d"]
    for row in range(3):
        for col in range(3):
            if (row, col) == (1, 2):
                continue  # the missing piece, lying beside the puzzle
            x, y = 40 + col * 80, 40 + row * 80
            d.rectangle([x, y, x + 80, y + 80], fill=colours[(row + col) % 6], outline="#222222", width=2)
            d.ellipse([x + 70, y + 30, x + 90, y + 50], fill=colours[(row + col) % 6])
    d.rectangle([220, 250, 300, 310], fill="#e76f51", outline="#222222", width=2)
    return image


def teddy_bear() -> Image.Image:
    image, d = canvas("#fde2e4")
    fur, dark = "#a0522d", "#5c3317"
    d.ellipse([95, 150, 225, 290], fill=fur)  # body
    d.ellipse([115, 60, 205, 150], fill=fur)  # head
    for ex in (110, 190):
        d.ellipse([ex - 22, 48, ex + 22, 92], fill=fur)
        d.ellipse([ex - 10, 60, ex + 10, 80], fill=dark)
    d.ellipse([140, 95, 150, 105], fill="#111111")
    d.ellipse([170, 95, 180, 105], fill="#111111")
    d.ellipse([150, 110, 170, 130], fill="#e9c9a8")
    d.ellipse([156, 112, 164, 120], fill="#111111")
    for x in (70, 215):
        d.ellipse([x, 170, x + 35, 230], fill=fur)
    d.ellipse([120, 190, 200, 260], fill="#e9c9a8")
    return image


def chess_board() -> Image.Image:
    image, d = canvas("#5c3317")
    for row in range(8):
        for col in range(8):
            x, y = 32 + col * 32, 32 + row * 32
            d.rectangle([x, y, x + 32, y + 32], fill="#f0d9b5" if (row + col) % 2 == 0 else "#b58863")
    for col in range(8):
        for row, colour in ((1, "#222222"), (6, "#fafafa")):
            cx, cy = 48 + col * 32, 48 + row * 32
            d.ellipse([cx - 10, cy - 10, cx + 10, cy + 10], fill=colour, outline="#777777")
    return image


# (id, title, description, seller table, [(image file, drawer)], label)
LISTINGS = [
    ("drawn-beach-ball", "Inflatable Rainbow Beach Ball 40cm - Pool & Garden Fun",
     "Bright six-panel inflatable beach ball for the pool, beach or garden. Soft vinyl, easy to inflate. Not suitable for children under 36 months.",
     {"Brand": "SunnyPlay", "Age": "3 years +", "Material": "PVC vinyl", "Batteries": "No"},
     [("beach_ball.png", beach_ball)],
     {"category": "Sports Toys & Outdoor > Beach Toys", "attributes": {"min_age_years": 3, "batteries_required": False, "material": ["plastic"]}}),
    ("drawn-stacking-blocks", "Wooden ABC Stacking Blocks (6 pcs) for Toddlers",
     "Six chunky painted wooden blocks with letters. Stack them, sort them by colour, knock them down. Water-based paint.",
     {"Brand": "Little Oak", "Manufacturer recommended age": "12 months and up", "Number of pieces": "6", "Material": "Beech wood"},
     [("stacking_blocks.png", stacking_blocks)],
     {"category": "Baby & Toddler Toys > Sorting, Stacking & Plugging Toys", "attributes": {"min_age_years": 1, "piece_count": 6, "assembly_required": False, "material": ["wood"]}}),
    ("drawn-red-car", "Friction Powered Red Toy Car - Push and Go",
     "Push it forward and let go: the friction motor sends this red car zooming across the floor. No batteries needed.",
     {"Brand": "ZoomZoom", "Colour": "Red", "Batteries Required?": "No", "Item Weight": "180 g", "Age": "3+"},
     [("red_car.jpg", toy_car), ("red_car_back.jpg", lambda: toy_car("#9d0208"))],
     {"category": "Die-Cast & Toy Vehicles > Toy Vehicles & Accessories", "attributes": {"min_age_years": 3, "batteries_required": False, "batteries_included": False, "material": ["plastic", "metal"]}}),
    ("drawn-kite", "Diamond Kite for Kids with 30m Line",
     "Easy-flying diamond kite in four colours, ready to fly in minutes: slot the two spars in and tie the line.",
     {"Brand": "SkyHigh", "Assembly required": "Yes", "Recommended age": "6 years and up", "Material": "Ripstop nylon, fibreglass"},
     [("kite.png", kite)],
     {"category": "Sports Toys & Outdoor > Kites & Flight Toys", "attributes": {"min_age_years": 6, "assembly_required": True, "batteries_required": False, "material": ["fabric"]}}),
    ("drawn-dice", "Classic Dice Set - 3 Large White Dice with Rounded Corners",
     "Three large easy-read dice for board games, maths games and classroom use.",
     {"Brand": "RollRight", "Number of Pieces": "3", "Age": "5 yrs+"},
     [("dice.png", dice)],
     {"category": "Games > Dice & Dice Games", "attributes": {"min_age_years": 5, "piece_count": 3, "batteries_required": False, "material": ["plastic"]}}),
    ("drawn-jigsaw", "Colour Block Jigsaw Puzzle 9 Pieces - My First Puzzle",
     "A first jigsaw with nine big sturdy cardboard pieces in bold colours.",
     {"Brand": "PuzzlePals", "Pieces": "9", "Recommended age": "2 years +"},
     [("jigsaw.png", jigsaw)],
     {"category": "Jigsaws & Puzzles > Jigsaws", "attributes": {"min_age_years": 2, "piece_count": 9, "material": ["cardboard"]}}),
    ("drawn-teddy", "Soft Brown Teddy Bear 30cm Plush Toy",
     "Cuddly classic teddy bear with embroidered eyes, safe from birth. Surface washable.",
     {"Brand": "Cuddle & Co", "Age": "0 months +", "Material": "Polyester plush", "Batteries": "Not needed"},
     [("teddy.png", teddy_bear)],
     {"category": "Dolls & Accessories > Soft Dolls", "attributes": {"min_age_years": 0, "batteries_required": False, "material": ["plush"]}}),
    ("drawn-chess", "Wooden Chess Set with Folding Board, 32 Pieces",
     "Travel chess set: folding wooden board with storage for all 32 pieces.",
     {"Brand": "Gambit", "Number of pieces": "32", "Age": "8 years and up", "Material": "Wood"},
     [("chess.jpg", chess_board)],
     {"category": "Games > Chess", "attributes": {"min_age_years": 8, "piece_count": 32, "assembly_required": False, "material": ["wood"]}}),
    ("drawn-card-game", "Snap! Card Game for Families (text-only listing)",
     "Fast family card game with 52 illustrated cards. A text-only listing: it has no photo.",
     {"Brand": "QuickCards", "Number of Pieces": "52", "Age": "4 years and up"},
     [],
     {"category": "Games > Card Games", "attributes": {"min_age_years": 4, "piece_count": 52, "batteries_required": False, "material": ["cardboard"]}}),
]


def main() -> None:
    images_dir = HERE / "images"
    images_dir.mkdir(exist_ok=True)
    with open(HERE / "catalog.jsonl", "w", encoding="utf-8") as out:
        for listing_id, title, description, table, pictures, label in LISTINGS:
            paths = []
            for name, draw in pictures:
                picture = draw()
                options = {"quality": 90} if name.endswith(".jpg") else {"optimize": True}
                picture.save(images_dir / name, **options)
                paths.append(f"images/{name}")
            row = {"id": listing_id, "title": title, "description": description,
                   "attributes": table, "images": paths, "label": label}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(LISTINGS)} listings to {HERE / 'catalog.jsonl'}")


if __name__ == "__main__":
    main()
