import pytest

from harness.units import parse_size


@pytest.mark.parametrize("text, expected", [
    ("1024", 1024), (2048, 2048), ("24GiB", 24 * 2**30), ("512 MB", 512 * 10**6),
    ("1.5KiB", 1536), ("3gb", 3 * 10**9), ("100B", 100),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "12 parsecs", "-5MiB", "0", 0, "1e3GB"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)
