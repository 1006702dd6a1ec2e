"""ISO 3166-1 alpha-2 codes: data sovereignty filters accept only real, assigned codes."""

from __future__ import annotations

import pytest

from control_plane.domain.countries import is_country_code


@pytest.mark.parametrize("code", ["DE", "FR", "US", "JP", "SG", "FI"])
def test_assigned_codes_are_country_codes(code: str) -> None:
    assert is_country_code(code)


@pytest.mark.parametrize("code", ["XX", "ZZ", "de", "DEU", "", "D"])
def test_unassigned_lower_case_and_malformed_codes_are_not(code: str) -> None:
    assert not is_country_code(code)
