"""``data.train`` as several catalogs: paths, globs and lists, each row's images in its own catalog's
folder, rows outside the taxonomy counted per category (never relabelled), and the faults named."""

from __future__ import annotations

import json
import logging

import pytest

from mmllm.collator import load_listing_images
from mmllm.config import load_config
from mmllm.images import ImagePolicy
from mmllm.recipes.common import InputError, load_training_rows, policy_for, train_sources
from mmllm.recipes.fusion import FusionRecipeConfig

from listings import small_schema, write_catalog


def _two_shops(tmp_path):
    """Two catalogs in two folders, each with its own img/ folder: ids item-0..5 and item-6..9."""
    first = write_catalog(tmp_path / "shop_a", n=6, name="a.jsonl")
    second = write_catalog(tmp_path / "shop_b", n=4, name="b.jsonl", start=6)
    return first, second


def test_several_catalogs_are_read_in_order_with_each_rows_images_in_its_own_folder(tmp_path):
    first, second = _two_shops(tmp_path)
    sources = train_sources([str(first), str(second)])
    rows = load_training_rows(sources, small_schema(), None)
    assert [r.id for r in rows] == [f"item-{i}" for i in range(10)]
    assert {r.source for r in rows} == {"a.jsonl", "b.jsonl"}
    policy = policy_for(sources, ImagePolicy())
    # item-6 (shop_b) names img/6.png, which exists only in shop_b/img: the row's own catalog's folder
    for row in rows:
        pictures = load_listing_images(row, policy, 2)
        assert len(pictures) == len(row.images)
    assert rows[6].images == ("img/6.png",) and not (tmp_path / "shop_a" / "img" / "6.png").exists()
    # one catalog: its folder is the root, as before
    assert policy_for([str(first)], ImagePolicy()).root == first.parent.resolve()
    # an explicit image root wins over the per-catalog folders
    explicit = policy_for(sources, ImagePolicy(root=tmp_path / "shop_b"))
    assert explicit.for_source("a.jsonl").root == tmp_path / "shop_b"
    assert rows[:3] == load_training_rows(sources, small_schema(), 3)  # data.max_train_rows counts across files


def test_a_glob_expands_sorted_and_the_faults_are_named(tmp_path):
    first, second = _two_shops(tmp_path)
    assert train_sources(str(tmp_path / "shop_*" / "*.jsonl")) == [str(first), str(second)]
    assert train_sources(str(first)) == [str(first)]
    with pytest.raises(InputError, match=r"data.train: the pattern .*nothing_\*.jsonl matches no file"):
        train_sources(str(tmp_path / "nothing_*.jsonl"))
    with pytest.raises(InputError, match=r"data.train: .*missing.jsonl does not exist"):
        train_sources([str(first), str(tmp_path / "missing.jsonl")])
    with pytest.raises(InputError, match=r"a.jsonl is named twice; its rows would count double"):
        train_sources([str(first), str(tmp_path / "shop_*" / "a.jsonl")])
    cfg = load_config(FusionRecipeConfig, None, [f"data.train=[{first}, {second}]", "data.dev=null"])
    assert cfg.data.train == [str(first), str(second)]
    with pytest.raises(ValueError, match="data.train is not set"):
        load_config(FusionRecipeConfig, None, ["data.train=[]"])


def test_rows_outside_the_taxonomy_are_counted_per_category_and_not_trained_on(tmp_path, caplog):
    first, _ = _two_shops(tmp_path)
    extra = tmp_path / "shop_c" / "c.jsonl"
    extra.parent.mkdir()
    rows = [{"id": f"x{i}", "title": f"Odd thing {i}",
             "label": {"category": "Garden > Hoses" if i < 3 else "Kitchen > Pans", "attributes": {}}} for i in range(5)]
    extra.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="mmllm.finetune"):
        kept = load_training_rows([str(first), str(extra)], small_schema(), None)
    assert [r.id for r in kept] == [f"item-{i}" for i in range(6)]
    summary = [m for m in caplog.messages if "outside schema" in m]
    assert summary == ["data.train: 5 of 11 labelled rows have a category outside schema 'small' and are not "
                       "trained on: 'Garden > Hoses' (3), 'Kitchen > Pans' (2)"]
    # each skipped row is named too, with its file, line and id
    assert any(m.startswith("skipped: c.jsonl line 1 (id 'x0'): label does not fit schema") for m in caplog.messages)
