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


@pytest.mark.parametrize("bits", ["8Gb", "512Mb", "1Tb", "64Kb", "8Gib"])
def test_bits_are_refused_with_a_hint(bits):
    with pytest.raises(ValueError, match="bits") as err:
        parse_budget(bits)
    assert bits[:-1] + "B" in str(err.value)


def test_numpy_integers_are_bytes():
    np = pytest.importorskip("numpy")
    assert parse_budget(np.int64(4096)) == 4096 and parse_budget(np.uint32(10)) == 10


@pytest.mark.parametrize("huge", [10**40, 1e100, "1TB"])
def test_budget_above_the_device_is_refused_when_asked(huge):
    with pytest.raises(ValueError, match="more than the device has"):
        parse_budget(huge, device_capacity=24 * 2**30, over_capacity=False)
    assert parse_budget(huge, device_capacity=24 * 2**30) > 24 * 2**30  # planning for another machine


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 1e9 + 0.5])
def test_non_finite_or_fractional_numbers_are_refused(bad):
    with pytest.raises(ValueError, match="budget"):
        parse_budget(bad)


def test_compile_refuses_a_budget_above_the_device():
    import torch

    import memsched

    model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="more than the device has"):
        memsched.compile(model, 10**40, device="cpu")
    cm = memsched.compile(model, 10**40, device="cpu", allow_over_capacity=True)
    x = torch.randn(2, 4)
    assert torch.equal(cm(x), model(x))
