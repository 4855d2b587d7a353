import pytest

from mxserve.errors import MxServeError
from mxserve.schemes import CANONICAL, get_scheme, parse_budget, parse_schemes


@pytest.mark.parametrize("name", [*CANONICAL, "w4a16", "w8a8", "w2a16g64", "w3a16g32"])
def test_names_round_trip(name):
    s = get_scheme(name)
    assert str(s) == name
    assert get_scheme(str(s)) is s


def test_bits_include_overhead():
    assert get_scheme("w4a16g128").bits_per_weight() == 4.25
    assert get_scheme("w3a16g128").bits_per_weight() == 3.25
    assert get_scheme("w2a16g128").bits_per_weight() == 2.25
    assert get_scheme("bf16").bits_per_weight() == 16
    # per-channel overhead depends on K: a bf16 scale (and zero) per row
    assert get_scheme("w8a16").bits_per_weight(256) == 8 + 32 / 256
    assert get_scheme("w8a8fp8").bits_per_weight(256) == 8 + 16 / 256
    assert get_scheme("w4a4").bits_per_weight(128) == 4 + 16 / 128


def test_scheme_properties():
    assert get_scheme("w8a8fp8").mma == "fp8"
    assert get_scheme("w4a4").mma == "int8"
    assert get_scheme("w4a16g128").mma == "bf16" and get_scheme("w4a16g128").weight_only
    assert not get_scheme("w4a16g128").supports(192)  # 192 is not a multiple of the group
    assert get_scheme("w8a8fp8").supports(192)


@pytest.mark.parametrize("bad", ["w5a16", "w1a4", "w4a16g100", "int4", "w4a8", "w4a4g128", "", "w16a16fp8"])
def test_unknown_scheme_is_clear_error(bad):
    with pytest.raises(MxServeError, match="unknown scheme"):
        get_scheme(bad)


def test_parse_schemes_list():
    assert [s.name for s in parse_schemes("w4a16g128, bf16,w4a16g128")] == ["w4a16g128", "bf16"]
    assert [s.name for s in parse_schemes(None)] == list(CANONICAL)


@pytest.mark.parametrize(
    "text,value", [("4bit", 4.0), ("3.25bit", 3.25), ("3.25", 3.25), ("2.5 bits", 2.5), (16, 16.0)]
)
def test_budget_forms(text, value):
    assert parse_budget(text) == value


@pytest.mark.parametrize("bad", ["four", "bit", "-1bit", "0", "nanbit", "17bit"])
def test_bad_budget(bad):
    with pytest.raises(MxServeError):
        parse_budget(bad)
