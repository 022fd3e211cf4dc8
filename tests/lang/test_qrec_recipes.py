"""Every shipped recipe checks clean, is in canonical form, and cites its seed."""

from __future__ import annotations

from pathlib import Path

import pytest

from qdsl.lang import check_file, format_text, load_recipe
from qdsl.resources import data_dir
from qdsl.config.spec import ACTIVATION, PerGroup, resolve

RECIPES = sorted(data_dir("recipes").glob("**/*.qrec"))


def test_recipes_exist():
    names = {p.relative_to(data_dir("recipes")).as_posix() for p in RECIPES}
    assert "card.qrec" in names
    assert len([n for n in names if n.startswith("storti/t3_")]) == 14  # 13 rows + diagnostic
    assert {f"wei/fig7_calib_{n}.qrec" for n in (32, 128, 512, 2048)} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(data_dir("recipes")).as_posix())
def test_recipe_is_clean_and_canonical(path: Path):
    assert check_file(path) == []
    text = path.read_text()
    assert format_text(text, str(path)) == text
    assert text.startswith("#")  # every shipped recipe says what it is for
    if path.parent.name in ("storti", "wei"):  # seed reproductions cite their paper
        assert "Storti" in text or "Wei" in text
    load_recipe(path)


def test_card_recipe_means_what_it_says():
    r = load_recipe(data_dir("recipes") / "card.qrec")
    res, fc = r.rules
    assert res.activation.bits == 16 and res.weight.is_empty()
    assert fc.weight.bits == 8 and fc.activation.granularity == PerGroup(8, True)


def test_storti_res_sum_cascade():
    r = load_recipe(data_dir("recipes") / "storti" / "t3_res_sum.qrec")
    base, res, head = r.rules
    act = resolve(ACTIVATION, base.activation.then(res.activation))
    assert act.describe() == "a16 asym per_tensor current_minmax static"
    assert head.skip and head.selector.optional


def test_wei_calibration_sizes():
    for n in (32, 128, 512, 2048):
        r = load_recipe(data_dir("recipes") / "wei" / f"fig7_calib_{n}.qrec")
        assert r.settings.calib_samples == n
