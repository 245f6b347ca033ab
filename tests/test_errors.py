"""The package's errors cross process boundaries intact (multiprocessing pools, spawn workers, torchrun
agents pickle a worker's exception to report it in the parent)."""

import pickle

import pytest

from layerlock_plugin.errors import CheckpointError, ConfigError, MissingDependencyError


@pytest.mark.parametrize("error", [
    ConfigError("schedule.interval", "must be a positive integer, got 0"),
    CheckpointError("checkpoint.pt: truncated"),
    MissingDependencyError("install layerlock-plugin[vjepa]"),
])
def test_errors_survive_pickling(error):
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error)
    assert getattr(back, "field", None) == getattr(error, "field", None)
