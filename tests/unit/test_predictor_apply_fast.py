"""AppModel.apply's cached-parse path leaves the model exactly as the general path does, for any key."""

from __future__ import annotations

from dataclasses import asdict

from hypothesis import given, settings
from hypothesis import strategies as st

from predictor.model import AppModel

_ROLES = st.sampled_from(["planner", "coder", "$end", "r|x", ""])
_PARTS = st.one_of(_ROLES, st.integers(-3, 500).map(str), st.sampled_from(["abc", "1.5", ""]))
_KINDS = st.sampled_from(["C", "O", "OS", "P", "PS", "FP", "T", "CR", "CN", "X", "XN", "S", "F", "V", "L", "LS", "R", "RS", "Z"])
_KEYS = st.builds(lambda k, parts: "|".join([k, *parts]), _KINDS, st.lists(_PARTS, max_size=4))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_KEYS, st.floats(-2, 5, allow_nan=False)), max_size=40))
def test_fast_apply_equals_general_apply(updates: list[tuple[str, float]]) -> None:
    fast, general = AppModel("a"), AppModel("a")
    for key, delta in updates:
        fast.apply(key, delta)
        general._apply_general(key, delta)
    assert asdict(fast) == asdict(general)
    assert list(fast.roles) == list(general.roles)  # same creation order too
