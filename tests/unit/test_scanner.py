from __future__ import annotations

import datetime as dt

import pytest

from imgworker.config import ScanConfig
from imgworker.outcomes import ImageRef
from imgworker.scanner import captured_at, is_image, parse_task, select_images

CFG = ScanConfig()


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("cam/person/t1/20240101-120000.123.jpg", True),
        ("cam/person/t1/20240101-120000.123.JPG", True),
        ("cam/person/t1/frame.png", True),
        ("cam/person/t1/meta.json", False),
        ("cam/person/t1/preview_20240101.jpg", False),
        ("cam/person/.hidden/a.jpg", False),
        ("cam/person/t1/.a.jpg", False),
        ("cam/alerts/person/t1/a.jpg", False),
        ("cam/results/a.jpg", False),
        ("cam/person/t1/", False),
        ("cam/中文 类型/任务 1/a %+#.jpg", True),
    ],
)
def test_is_image(key, expected):
    assert is_image(key, prefix="cam/", cfg=CFG) is expected


def test_parse_task_from_layout():
    assert parse_task("cam/person/t1/20240101-120000.123.jpg", "cam/") == ("person", "t1")
    assert parse_task("cam/人员/任务 1/x.jpg", "cam") == ("人员", "任务 1")


@pytest.mark.parametrize("key", ["cam/x.jpg", "cam/a/x.jpg", "cam/a/b/c/x.jpg", "cam//b/x.jpg"])
def test_parse_task_empty_when_not_laid_out(key):
    assert parse_task(key, "cam/") == ("", "")


def test_captured_at():
    expected = dt.datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=dt.timezone.utc).timestamp()
    assert captured_at("a/b/c/20240102-030405.678.jpg") == pytest.approx(expected)
    assert captured_at("a/b/c/frame.jpg") is None
    assert captured_at("a/b/c/20241399-030405.678.jpg") is None


def test_select_images_filters_and_fills_task_fields():
    page = [ImageRef(key="cam/p/t/1.jpg", size=3), ImageRef(key="cam/p/t/x.json"), ImageRef(key="cam/a.jpg")]
    out = select_images(page, prefix="cam/", cfg=CFG)
    assert out == [ImageRef(key="cam/p/t/1.jpg", task_type="p", task_id="t", size=3), ImageRef(key="cam/a.jpg")]


def test_custom_extensions_and_excludes():
    cfg = ScanConfig(extensions=(".tif",), exclude_prefixes=("skip/",))
    assert is_image("x/a.TIF", prefix="", cfg=cfg)
    assert not is_image("x/a.jpg", prefix="", cfg=cfg)
    assert not is_image("skip/a.tif", prefix="", cfg=cfg)


def test_extensions_configured_in_upper_case_match_keys_in_any_case():
    cfg = ScanConfig(extensions=(".JPG",))
    assert is_image("x/a.jpg", prefix="", cfg=cfg) and is_image("x/b.JPG", prefix="", cfg=cfg)
    assert [r.key for r in select_images([ImageRef(key="p/t/a.jpg"), ImageRef(key="p/t/b.png")], prefix="",
                                         cfg=cfg)] == ["p/t/a.jpg"]
