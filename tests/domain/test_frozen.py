"""FrozenModel's equality is pydantic's for the domain's models: by fields, within one class."""

from __future__ import annotations

from runstate.domain import EmpiricalPolicy, State, StateDetails, TaskRunView
from runstate.events import StoredState

from .builders import S, run, state


def test_equal_fields_are_equal_and_hash_alike_and_any_field_differing_is_not():
    a, b = state(S.RUNNING), state(S.RUNNING)
    assert a == b and hash(a) == hash(b) and (a != b) is False
    assert a != a.model_copy(update={"name": "Other"})
    assert a != a.model_copy(update={"state_details": StateDetails(cache_key="k")})
    assert EmpiricalPolicy() == EmpiricalPolicy() and EmpiricalPolicy(retries=1) != EmpiricalPolicy()
    r = run(state(S.RUNNING))
    assert r == TaskRunView.model_validate(r.model_dump()) and r != r.model_copy(update={"run_count": 7})


def test_models_of_other_classes_or_other_values_are_not_equal():
    a = state(S.RUNNING)
    assert a != StoredState.model_validate(a.model_dump())  # a subclass, as pydantic has it
    assert a != None and a != a.model_dump() and a != "RUNNING"  # noqa: E711 - the comparison is the test
    assert State.__eq__(a, a.model_dump()) is NotImplemented
