"""Weights-only loading: pickled code is refused without running; Lightning metadata loads."""
import os
import sys
import types

import pytest
import torch

from taming_dist.checkpoint.safe_load import safe_load


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "PWNED"
    torch.save({"state_dict": {"w": torch.ones(1)}, "evil": _Evil(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match=r"contains pickled code \((posix|nt|os)\.system\).*not executed"):
        safe_load(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_eval_builtin_is_refused(tmp_path):
    class Sneaky:
        def __reduce__(self):
            return (eval, ("1+1",))

    torch.save([Sneaky()], tmp_path / "e.pt")
    with pytest.raises(ValueError, match=r"_*builtins?_*\.eval"):
        safe_load(tmp_path / "e.pt")


def _fake_lightning_class(monkeypatch, module: str, name: str, base=dict):
    """Define a class under a Lightning/omegaconf module name (as the original checkpoints pickle)."""
    cls = type(name, (base,), {})
    cls.__module__ = module
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    setattr(sys.modules[module], name, cls)
    return cls


def test_lightning_checkpoint_loads_without_lightning(tmp_path, monkeypatch):
    AttributeDict = _fake_lightning_class(monkeypatch, "pytorch_lightning.utilities.parsing", "AttributeDict")
    ModelCheckpoint = _fake_lightning_class(monkeypatch, "pytorch_lightning.callbacks.model_checkpoint",
                                            "ModelCheckpoint", base=object)
    hp = AttributeDict(n_embed=1024, embed_dim=256)
    cb = ModelCheckpoint()
    cb.best_model_path = "x"
    ckpt = {"epoch": 3, "global_step": 100, "state_dict": {"encoder.conv_in.weight": torch.randn(2, 3)},
            "hyper_parameters": hp, "callbacks": {ModelCheckpoint: cb}, "optimizer_states": [{"state": {}}]}
    torch.save(ckpt, tmp_path / "last.ckpt")
    for m in [m for m in sys.modules if m.startswith("pytorch_lightning")]:
        monkeypatch.delitem(sys.modules, m)  # as on a machine without Lightning
    with pytest.warns(UserWarning, match="stand-ins"):
        obj = safe_load(tmp_path / "last.ckpt")
    assert torch.equal(obj["state_dict"]["encoder.conv_in.weight"], ckpt["state_dict"]["encoder.conv_in.weight"])
    assert obj["hyper_parameters"]["n_embed"] == 1024 and obj["global_step"] == 100


def test_plain_and_safetensors_files(tmp_path):
    from safetensors.torch import save_file

    torch.save({"a": torch.arange(3)}, tmp_path / "p.pt")
    assert torch.equal(safe_load(tmp_path / "p.pt")["a"], torch.arange(3))
    save_file({"b": torch.ones(2)}, str(tmp_path / "w.safetensors"))
    assert torch.equal(safe_load(tmp_path / "w.safetensors")["b"], torch.ones(2))
    with pytest.raises(FileNotFoundError):
        safe_load(tmp_path / "missing.pt")
