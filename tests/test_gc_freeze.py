"""Full garbage collections skip what start-up and model loads keep (gc.freeze)."""

from __future__ import annotations

import gc

import pytest

from stella import gc_freeze


def frozen(obj: object) -> bool:
    """Tracked by the collector, but in none of the generations it collects."""
    return gc.is_tracked(obj) and not any(o is obj for o in gc.get_objects())


async def test_what_start_up_made_is_frozen_before_the_first_call() -> None:
    from stella.app import create_app
    from stella.settings import load_settings
    from tests.live import NO_MLX

    gc.unfreeze()  # what an earlier test of this process froze
    app = create_app(load_settings(NO_MLX, environ={}))
    router = app.state.stella.router
    assert not frozen(router)
    async with app.router.lifespan_context(app):
        assert gc.get_freeze_count() > 0 and frozen(router)


async def test_a_model_load_sets_off_no_full_collection_and_what_it_made_is_frozen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from stella.backends.mlx.backend import MlxBackend, MlxConfig
    from stella.backends.mlx.engine import LoadedModel
    from stella.errors import UpstreamError

    thresholds: list[tuple[int, int, int]] = []
    broken = False

    def load(source: str, cache_dir: str, dtype: str, blas: str) -> LoadedModel:
        thresholds.append(gc.get_threshold())
        if broken:
            raise ValueError("a corrupt model")
        return LoadedModel(path=source, model={"weights": [1.0]}, tokenizer={"vocab": {}})

    monkeypatch.setattr(MlxBackend, "_load", staticmethod(load))
    gc.unfreeze()
    young, middle, oldest = gc.get_threshold()
    b = MlxBackend("local", MlxConfig(kind="mlx", preload=False))
    await b.start()
    try:
        model = await b.ensure_loaded("")
        # The young generations were still collected during the load, the oldest was not.
        assert thresholds == [(young, middle, gc_freeze.NEVER)]
        assert gc.get_threshold() == (young, middle, oldest)
        assert frozen(model) and frozen(model.model)
        # A failed load freezes nothing (its traceback's cycles must stay collectable).
        b.loaded_models.clear()
        gc.unfreeze()
        broken = True
        with pytest.raises(UpstreamError):
            await b.ensure_loaded("")
        assert gc.get_freeze_count() == 0
        assert gc.get_threshold() == (young, middle, oldest)
    finally:
        await b.aclose()


def test_loads_side_by_side_give_the_threshold_back_when_the_last_ends() -> None:
    # Two backends' workers may load at once: the first to end must not let full
    # collections run again while the other still loads.
    import threading

    first_runs, first_may_end = threading.Event(), threading.Event()

    def first() -> None:
        first_runs.set()
        first_may_end.wait(5)

    before = gc.get_threshold()
    thread = threading.Thread(target=gc_freeze.load_frozen, args=(first,))
    thread.start()
    assert first_runs.wait(5)
    gc_freeze.load_frozen(lambda: None)  # a second load, begun and ended meanwhile
    assert gc.get_threshold() == (before[0], before[1], gc_freeze.NEVER)  # the first runs
    first_may_end.set()
    thread.join(5)
    assert gc.get_threshold() == before
