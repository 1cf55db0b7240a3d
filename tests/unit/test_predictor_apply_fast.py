"""AppModel.apply's cached-parse path leaves the model exactly as the general path does, for any key."""

from __future__ import annotations

from dataclasses import asdict

from hypothesis import given, settings
from hypothesis import strategies as st

from predictor.model import AppModel

_ROLES = st.sampled_from(["planner", "coder", "$end", "r|x", ""])
_PARTS = st.one_of(_ROLES, st.integers(-3, 500).map(str), st.sampled_from(["abc", "1.5", ""]))
_KINDS = st.sampled_from(["C", "O", "OS", "P", "PS", "FP", "T", "CR", "CN", "X", "XN", "S", "F", "V", "L", "LS", "R", "RS", "Q", "QS",
                          "G", "GS", "Z"])
_RANDOM_KEYS = st.builds(lambda k, parts: "|".join([k, *parts]), _KINDS, st.lists(_PARTS, max_size=4))
# keys as the predictor writes them (every kind with its own fields), which random parts rarely hit
_INTS = st.integers(0, 30).map(str)
_KEYS = st.one_of(
    _RANDOM_KEYS,
    st.builds(lambda k, r: f"{k}|{r}", st.sampled_from(["C", "OS", "PS", "X", "XN", "S"]), _ROLES),
    st.builds(lambda k, r, i: f"{k}|{r}|{i}", st.sampled_from(["O", "P", "F", "V", "RS", "QS", "GS"]), _ROLES, _INTS),
    st.builds(lambda k, r, i, b: f"{k}|{r}|{i}|{b}", st.sampled_from(["R", "Q", "G"]), _ROLES, _INTS, _INTS),
    st.builds(lambda r, i, n: f"T|{r}|{i}|{n}", _ROLES, _INTS, _ROLES),
    st.builds(lambda k, r, x: f"{k}|{r}|{x}", st.sampled_from(["FP", "CR", "CN"]), _ROLES, _ROLES),
    st.builds(lambda b: f"L|{b}", _INTS),
    st.just("LS"),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_KEYS, st.floats(-2, 5, allow_nan=False)), max_size=40))
def test_fast_apply_equals_general_apply(updates: list[tuple[str, float]]) -> None:
    fast, general = AppModel("a"), AppModel("a")
    for key, delta in updates:
        fast.apply(key, delta)
        general._apply_general(key, delta)
    assert asdict(fast) == asdict(general)
    assert list(fast.roles) == list(general.roles)  # same creation order too
