"""A test asset that cannot be fetched fails the tests that need it, with the command to run, unless the
run opts in to skipping them (EPS_TESTS_OFFLINE=1)."""

from __future__ import annotations

import pytest
from conftest import missing_asset


@pytest.mark.parametrize("value", [None, "0", "", "yes"])
def test_a_missing_asset_fails_and_says_to_run_make_assets(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("EPS_TESTS_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("EPS_TESTS_OFFLINE", value)
    with pytest.raises(pytest.fail.Exception, match=r"IS-Net small .*no route to host.*run `make assets`.*"
                                                    r"EPS_TESTS_OFFLINE=1"):
        missing_asset("IS-Net small", OSError("no route to host"))


def test_eps_tests_offline_1_turns_the_failure_into_a_skip(monkeypatch):
    monkeypatch.setenv("EPS_TESTS_OFFLINE", "1")
    with pytest.raises(pytest.skip.Exception, match="EPS_TESTS_OFFLINE=1 and vega could not be fetched: offline"):
        missing_asset("vega", OSError("offline"))
