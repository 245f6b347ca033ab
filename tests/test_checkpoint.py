import os

import pytest
import torch

from layerlock_plugin.checkpoint import check_model_state, load_checkpoint, save_atomic
from layerlock_plugin.errors import CheckpointError


def test_atomic_save_roundtrip_and_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_atomic({"a": torch.arange(3)}, path)
    assert torch.equal(load_checkpoint(path)["a"], torch.arange(3))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["a"], torch.arange(3)), "old checkpoint intact"
    assert os.listdir(tmp_path) == ["ckpt.pt"], "no temporary file left behind"


def test_truncated_and_foreign_files_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_atomic({"w": torch.randn(100, 100)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_code_in_pickle_is_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_different_model_names_keys():
    a = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    b = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 2), torch.nn.ReLU())
    check_model_state(a, a.state_dict())
    with pytest.raises(CheckpointError, match=r"shape mismatches: 0.weight: checkpoint \(5, 4\) vs model \(4, 4\)"):
        check_model_state(a, b.state_dict())
    with pytest.raises(CheckpointError, match=r"missing keys: 1.bias"):
        check_model_state(a, {k: v for k, v in a.state_dict().items() if k != "1.bias"})
