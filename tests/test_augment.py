"""Training-time augmentation: real pixels and real listings, every switch on its own."""

from __future__ import annotations

import random

import pytest
from PIL import Image, ImageDraw

from mmllm.augment import AugmentConfig, augment_images, augment_listing
from mmllm.catalog import Listing
from mmllm.config import ConfigError, describe, load_config

RED, BLUE = (255, 0, 0), (0, 0, 255)
W, H = 32, 24
TITLE = "LEGO Classic Creative Brick Box"
TABLE = {f"key{i}": f"value{i}" for i in range(8)}
LABEL = {"category": "Toys > Building", "attributes": {"brand": "LEGO"}}


def red_blue() -> Image.Image:
    """Left half red, right half blue."""
    img = Image.new("RGB", (W, H), BLUE)
    ImageDraw.Draw(img).rectangle((0, 0, W // 2 - 1, H - 1), fill=RED)
    return img


def gradient() -> Image.Image:
    """Red channel grows with x (8 per pixel), green with y (10 per pixel): pixels say where they came from."""
    img = Image.new("RGB", (W, H))
    img.putdata([(8 * x, 10 * y, 0) for y in range(H) for x in range(W)])
    return img


def listing(**kw) -> Listing:
    return Listing(id="sku-1", title=kw.pop("title", TITLE), attributes=kw.pop("attributes", dict(TABLE)),
                   images=("a.jpg",), label=LABEL, **kw)


def pixels(img: Image.Image) -> bytes:
    return img.tobytes()


def test_default_config_is_disabled_and_changes_nothing():
    cfg = AugmentConfig()
    assert not cfg.enabled
    img, item = red_blue(), listing()
    out = augment_images([img], cfg, random.Random(0))
    assert out[0] is img and pixels(out[0]) == pixels(red_blue())
    assert augment_listing(item, cfg, random.Random(0)) is item
    for switch in [{"image_flip": 0.1}, {"color_jitter": 0.1}, {"table_shuffle": True}, {"title_perturb": 0.1}]:
        assert AugmentConfig(**switch).enabled


def test_every_field_has_help_and_loads_from_overrides():
    assert all(help_text for _, help_text, _ in describe(AugmentConfig))
    cfg = load_config(AugmentConfig, None, ["image_flip=0.5", "table_shuffle=true"])
    assert cfg.image_flip == 0.5 and cfg.table_shuffle


@pytest.mark.parametrize(
    "kwargs, field",
    [({"image_flip": 1.5}, "image_flip"), ({"table_dropout": -0.1}, "table_dropout"),
     ({"color_jitter": float("nan")}, "color_jitter"), ({"crop_min_scale": 0}, "crop_min_scale"),
     ({"crop_min_scale": 1.2}, "crop_min_scale"), ({"title_perturb": "high"}, "title_perturb")],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AugmentConfig(**kwargs)


def test_config_error_from_yaml_override_names_the_field():
    with pytest.raises(ConfigError, match="image_crop"):
        load_config(AugmentConfig, None, ["image_crop=2"])


def test_flip_mirrors_pixels():
    (out,) = augment_images([red_blue()], AugmentConfig(image_flip=1.0), random.Random(0))
    assert out.mode == "RGB" and out.size == (W, H)
    assert out.getpixel((0, 0)) == BLUE and out.getpixel((W - 1, H - 1)) == RED
    assert pixels(out) == pixels(red_blue().transpose(Image.Transpose.FLIP_LEFT_RIGHT))


def test_zero_probabilities_change_nothing_even_when_enabled():
    # Only the text is augmented: images come back with identical pixels.
    cfg = AugmentConfig(image_flip=0.0, image_crop=0.0, color_jitter=0.0, table_shuffle=True)
    out = augment_images([red_blue(), gradient()], cfg, random.Random(1))
    assert [pixels(i) for i in out] == [pixels(red_blue()), pixels(gradient())]
    # Only the images are augmented: the listing is untouched.
    item = listing()
    assert augment_listing(item, AugmentConfig(image_flip=1.0, table_dropout=0.0), random.Random(1)) is item


def test_crop_keeps_size_and_zooms_into_a_bounded_window():
    cfg = AugmentConfig(image_crop=1.0, crop_min_scale=0.5)
    changed = 0
    for seed in range(10):
        (out,) = augment_images([gradient()], cfg, random.Random(seed))
        assert out.mode == "RGB" and out.size == (W, H)
        (r0, g0, _), (r1, g1, _) = out.getpixel((0, 0)), out.getpixel((W - 1, H - 1))
        # The window starts within the first half of each side and spans at least half of it.
        assert r0 <= 8 * (W // 2) + 8 and g0 <= 10 * (H // 2) + 10
        assert r1 - r0 >= 8 * (W // 2 - 2) and g1 - g0 >= 10 * (H // 2 - 2)
        changed += pixels(out) != pixels(gradient())
    assert changed >= 8


def test_color_jitter_stays_within_the_factor_bounds():
    grey = Image.new("RGB", (W, H), (128, 128, 128))
    values = set()
    for seed in range(10):
        (out,) = augment_images([grey], AugmentConfig(color_jitter=0.5), random.Random(seed))
        assert out.mode == "RGB" and out.size == (W, H)
        # On flat grey contrast and saturation are no-ops, so only brightness in [0.5, 1.5] acts.
        ((_, value),) = out.getcolors()
        assert value[0] == value[1] == value[2] and 64 <= value[0] <= 192
        values.add(value)
    assert len(values) >= 5
    (out,) = augment_images([red_blue()], AugmentConfig(color_jitter=0.3), random.Random(0))
    assert pixels(out) != pixels(red_blue())


def test_same_seed_same_output_different_seeds_differ():
    cfg = AugmentConfig(image_flip=0.5, image_crop=0.5, crop_min_scale=0.5, color_jitter=0.4,
                        table_shuffle=True, table_dropout=0.3, title_perturb=0.7)

    def run(seed):
        rng = random.Random(seed)
        item = augment_listing(listing(), cfg, rng)
        imgs = augment_images([red_blue(), gradient()], cfg, rng)
        return item.title, list(item.attributes.items()), [pixels(i) for i in imgs]

    assert run(42) == run(42)
    assert len({repr(run(seed)) for seed in range(5)}) > 1


def test_table_shuffle_keeps_items_in_another_order():
    orders = set()
    for seed in range(5):
        out = augment_listing(listing(), AugmentConfig(table_shuffle=True), random.Random(seed))
        assert out.attributes == TABLE  # same items (dict equality ignores order)
        orders.add(tuple(out.attributes))
    assert any(order != tuple(TABLE) for order in orders)


def test_table_dropout():
    item = listing()
    assert augment_listing(item, AugmentConfig(table_dropout=1.0), random.Random(0)).attributes == {}
    kept_sizes = set()
    for seed in range(10):
        out = augment_listing(item, AugmentConfig(table_dropout=0.5), random.Random(seed))
        assert out.attributes.items() <= TABLE.items()
        kept_sizes.add(len(out.attributes))
    assert len(kept_sizes) > 1 and any(0 < n < len(TABLE) for n in kept_sizes)
    assert item.attributes == TABLE  # the original listing is untouched
    empty = listing(attributes={})
    assert augment_listing(empty, AugmentConfig(table_dropout=0.9), random.Random(0)).attributes == {}


def test_title_perturb_changes_title_using_only_original_words():
    words = {w.lower() for w in TITLE.split()}
    for seed in range(20):
        out = augment_listing(listing(), AugmentConfig(title_perturb=1.0), random.Random(seed))
        assert out.title != TITLE and out.title.strip()
        assert {w.lower() for w in out.title.split()} <= words
        assert len(out.title.split()) >= len(words) - 1


@pytest.mark.parametrize("title", ["Robot", "robot", "42"])
def test_title_perturb_keeps_one_word_titles_non_empty(title):
    for seed in range(10):
        out = augment_listing(listing(title=title), AugmentConfig(title_perturb=1.0), random.Random(seed))
        assert out.title.lower() == title.lower()


def test_label_and_id_never_change():
    cfg = AugmentConfig(table_shuffle=True, table_dropout=0.5, title_perturb=1.0, image_flip=1.0)
    item = listing()
    for seed in range(5):
        out = augment_listing(item, cfg, random.Random(seed))
        assert out is not item
        assert (out.id, out.label, out.images, out.description) == (item.id, LABEL, item.images, item.description)
    assert (item.title, item.attributes) == (TITLE, TABLE)
