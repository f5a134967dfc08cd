"""The stored keys as they grow: what a purged key leaves behind."""

from __future__ import annotations

import asyncio

import pytest

from tests.live import merge
from tests.test_key_lifecycle import chat, made
from tests.test_keys import KEYS, ROOT, app_for, calls


def test_a_purged_key_leaves_nothing_in_the_limiter_and_its_plans_make_room(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from stella import limits

    monkeypatch.setattr(limits, "PLANS_KEPT", 3)
    app = app_for(merge(KEYS, {"limits": {"max_concurrent": 2, "requests_per_minute": 100}}))
    admission = app.state.stella.admission
    keys = [made(app, {"name": f"k{i}"}) for i in range(5)]
    for key in keys:
        assert chat(app, key).status_code == 200
    # The newest plans kept, the oldest gone: not the first ones kept and nothing new.
    assert len(admission._plans) == 3
    assert {p[0] for p in admission._plans} == {"k2", "k3", "k4"}
    (r,) = asyncio.run(calls(app, ("DELETE", "/api/v1/keys/k4?purge=true", ROOT, None)))
    assert r.status_code == 200, r.text
    # No slot of any name is kept while no call holds one.
    assert admission.slots._sems == {}
