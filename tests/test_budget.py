import pytest

from memsched import format_bytes, parse_budget


@pytest.mark.parametrize("text, expected", [
    (1000, 1000), ("8GB", 8 * 10**9), ("8GiB", 8 * 2**30), ("512MB", 512 * 10**6),
    ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), (" 64 KiB ", 64 * 1024), ("100B", 100),
    ("2048", 2048), ("1tb", 10**12),
])
def test_parse_budget_forms(text, expected):
    assert parse_budget(text) == expected


def test_percent_of_device():
    assert parse_budget("50%", device_capacity=1000) == 500
    with pytest.raises(ValueError, match="capacity"):
        parse_budget("50%")


@pytest.mark.parametrize("bad", ["8XB", "GB", "abc", "", "-1GB", "1e9", "150%", "0%", 0, -5, 0.5, True, None, [1]])
def test_malformed_budget_names_accepted_forms(bad):
    with pytest.raises(ValueError) as err:
        parse_budget(bad, device_capacity=10**9)
    assert "budget" in str(err.value)


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 2**30) == "3.0 GiB"
