"""Training-time data augmentation: image flips / crops / colour jitter, seller-table row
shuffling and dropout, title perturbation. Every switch is off by default.

Only the inputs are changed, never the label: the model should learn that the gold JSON
does not depend on a mirrored photo, the order of the seller's table or a missing row.

All randomness comes from the ``random.Random`` passed in (never the global RNG, never
torch's), so the training loop can reseed per (epoch, example) and an interrupted run
resumes with exactly the same augmented examples.

    cfg = AugmentConfig(image_flip=0.5, table_dropout=0.1)
    rng = random.Random(f"{seed}:{epoch}:{listing.id}")
    listing = augment_listing(listing, cfg, rng)
    images = augment_images(images, cfg, rng)
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from PIL import Image, ImageEnhance, ImageOps

from mmllm.catalog import Listing
from mmllm.config import help_field

__all__ = ["AugmentConfig", "augment_images", "augment_listing"]

_PROBABILITIES = ("image_flip", "image_crop", "color_jitter", "table_dropout", "title_perturb")


@dataclass
class AugmentConfig:
    """Which augmentations run during training, and how strongly. All off by default.

    Each probability is drawn independently per image (image switches) or per listing
    (text switches). Augmentation trades fit on the training set for robustness to
    noisy seller data; keep it off for evaluation and for small smoke runs.
    """

    image_flip: float = help_field(
        0.0,
        "Probability of a horizontal flip per image. Cheap and safe for most toys; "
        "mirrors any printed text on the box, so keep it low when text in photos matters.",
    )
    image_crop: float = help_field(
        0.0,
        "Probability of a random crop per image, resized back to the original size. "
        "Teaches robustness to framing, but a tight crop can cut off the toy or its label.",
    )
    crop_min_scale: float = help_field(
        0.8,
        "Smallest crop side as a fraction of the image side, in (0, 1]. Lower values "
        "augment more strongly and lose more of the picture.",
    )
    color_jitter: float = help_field(
        0.0,
        "Colour jitter strength in [0, 1]: brightness, contrast and saturation factors drawn "
        "in [1-s, 1+s]. Helps with lighting differences; large values distort the true colour "
        "that a 'colour' attribute is read from.",
    )
    table_shuffle: bool = help_field(
        False,
        "Shuffle the order of the seller-table rows, so the model reads rows by name, not by "
        "position. Costs nothing in information.",
    )
    table_dropout: float = help_field(
        0.0,
        "Probability of dropping each seller-table row, so the model learns to fill attributes "
        "from the title, description and images. Too high and it learns to ignore the table.",
    )
    title_perturb: float = help_field(
        0.0,
        "Probability of perturbing the title (drop one word, swap two adjacent words, or change "
        "case). Models sloppy seller titles; a dropped word can be the one holding an attribute.",
    )

    def __post_init__(self) -> None:
        for name in _PROBABILITIES:
            value = getattr(self, name)
            # `not 0 <= value <= 1` also rejects NaN, which would silently never fire.
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"augment.{name} must be a number in [0, 1], got {value!r}")
        scale = self.crop_min_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 1:
            raise ValueError(f"augment.crop_min_scale must be in (0, 1] (0 would crop to nothing), got {scale!r}")
        if not isinstance(self.table_shuffle, bool):
            raise ValueError(f"augment.table_shuffle must be true or false, got {self.table_shuffle!r}")

    @property
    def images_enabled(self) -> bool:
        """Whether any image augmentation is switched on."""
        return self.image_flip > 0 or self.image_crop > 0 or self.color_jitter > 0

    @property
    def text_enabled(self) -> bool:
        """Whether any seller-table or title augmentation is switched on."""
        return self.table_shuffle or self.table_dropout > 0 or self.title_perturb > 0

    @property
    def enabled(self) -> bool:
        """Whether any augmentation is switched on."""
        return self.images_enabled or self.text_enabled


def _happens(p: float, rng: random.Random) -> bool:
    # An off switch draws nothing from rng, so it does not shift the draws of the others.
    return p > 0 and rng.random() < p


def augment_images(images: list[Image.Image], cfg: AugmentConfig, rng: random.Random) -> list[Image.Image]:
    """Flip, crop and colour-jitter each image as ``cfg`` says; sizes and modes are kept."""
    if not cfg.images_enabled:
        return list(images)
    out = []
    for img in images:
        if _happens(cfg.image_flip, rng):
            img = ImageOps.mirror(img)
        if _happens(cfg.image_crop, rng):
            img = _random_crop(img, cfg.crop_min_scale, rng)
        if cfg.color_jitter > 0:
            img = _color_jitter(img, cfg.color_jitter, rng)
        out.append(img)
    return out


def _random_crop(img: Image.Image, min_scale: float, rng: random.Random) -> Image.Image:
    # One scale for both sides keeps the aspect ratio, so the toy is not stretched; resizing
    # back keeps the vision token count (which depends on the size) the same as unaugmented.
    width, height = img.size
    scale = rng.uniform(min_scale, 1.0)
    crop_w, crop_h = max(1, round(width * scale)), max(1, round(height * scale))
    left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
    box = (left, top, left + crop_w, top + crop_h)
    return img.crop(box).resize((width, height), Image.Resampling.BILINEAR)


def _color_jitter(img: Image.Image, strength: float, rng: random.Random) -> Image.Image:
    # ImageEnhance.Color is saturation. A fixed order keeps the draws reproducible.
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhancer(img).enhance(rng.uniform(1 - strength, 1 + strength))
    return img


def augment_listing(listing: Listing, cfg: AugmentConfig, rng: random.Random) -> Listing:
    """A copy of ``listing`` with its seller table and title augmented; the label never changes."""
    if not cfg.text_enabled:
        return listing
    rows = list(listing.attributes.items())
    if cfg.table_dropout > 0:
        rows = [row for row in rows if rng.random() >= cfg.table_dropout]
    if cfg.table_shuffle:
        rng.shuffle(rows)
    title = _perturb_title(listing.title, rng) if _happens(cfg.title_perturb, rng) else listing.title
    return dataclasses.replace(listing, attributes=dict(rows), title=title)


def _perturb_title(title: str, rng: random.Random) -> str:
    """Drop one word, swap two adjacent words or change the case; never returns an empty title.

    Only operations that actually change the title are chosen from, so a perturbation that
    fired is visible; a title none of them can change (e.g. one word of digits) is kept.
    """
    words = title.split()
    swappable = [i for i in range(len(words) - 1) if words[i] != words[i + 1]]
    cases = [t for t in dict.fromkeys((title.lower(), title.upper(), title.title())) if t != title]
    ops = []
    if len(words) >= 2:  # dropping the only word would leave an empty title
        ops.append("drop")
    if swappable:
        ops.append("swap")
    if cases:
        ops.append("case")
    if not ops:
        return title
    op = rng.choice(ops)
    if op == "drop":
        del words[rng.randrange(len(words))]
    elif op == "swap":
        i = rng.choice(swappable)
        words[i], words[i + 1] = words[i + 1], words[i]
    else:
        return rng.choice(cases)
    return " ".join(words)
