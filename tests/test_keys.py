"""Dask keys of obdask jobs: one group per plan, plan ids intact under key_split."""

from __future__ import annotations

from dask.utils import key_split
from distributed.utils import key_split_group
from hypothesis import given
from hypothesis import strategies as st

from obdask.keys import dask_key, group_name, job_id_of

PLAN_IDS = st.from_regex(r"[\w.\-]{1,40}", fullmatch=True).filter(
    lambda s: s.isascii() and s.strip(".") != "")


def test_hyphenated_plan_id_survives_key_split():
    key = dask_key("nightly-build", "step.01")
    assert key == ("nightly-build", "nightly-build::step.01")
    assert key_split(key) == "nightly-build"


def test_plan_id_with_digit_word_keeps_every_part():
    assert key_split(dask_key("nightly-2", "a")) == "nightly_2"
    assert key_split(dask_key("plan-abcdef12", "a")) == "plan_abcdef12"


def test_plan_ids_key_split_would_cut_keep_every_part():
    # found by hypothesis: a '_'-joined word glued onto a kept one ("p-A_"); key_split
    # also cuts any 8-letter word starting a-f and names 32 hex digits "data"
    for plan_id in ("-A-", "nightly-build-2", "x-database", "abcdef0123456789abcdef0123456789"):
        assert key_split(dask_key(plan_id, "s")) == group_name(plan_id), plan_id
    assert group_name("x-database") == "x_database"
    assert group_name("nightly-build") == "nightly-build"


@given(PLAN_IDS)
def test_group_name_is_its_own_key_split(plan_id):
    key = dask_key(plan_id, "s")
    assert key_split(key) == group_name(plan_id)
    assert key_split_group(key) == group_name(plan_id)


def test_job_id_of():
    assert job_id_of(("p", "p::a")) == "p::a"
    assert job_id_of(["p", "p::a"]) == "p::a"
    assert job_id_of("p::a") is None
    assert job_id_of(("p", "a")) is None
