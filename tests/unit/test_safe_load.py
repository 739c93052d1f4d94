"""Weights-only loading: pickled code is refused without running; Lightning/omegaconf metadata loads
as plain data without those packages."""
import argparse
import collections
import os
import pathlib
import sys
import types
import typing
import warnings

import pytest
import torch

from taming_dist.weights.safe_load import safe_load

LEGACY = {"_use_new_zipfile_serialization": False}  # the pre-1.6 torch format, which cannot be pre-scanned


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _RunsEval:
    def __reduce__(self):
        return (eval, ("__import__('os').system('touch EVAL_RAN')",))


def fake_class(monkeypatch, qualified: str, base=object, **attrs):
    """A class pickled under `qualified` (e.g. a Lightning class): its module is faked in sys.modules
    only while the test saves; the tests drop it again before loading, as on a machine without it."""
    module, _, name = qualified.rpartition(".")
    cls = type(name, (base,), attrs)
    cls.__module__, cls.__qualname__ = module, name
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        name_i = ".".join(parts[:i])
        if name_i not in sys.modules:
            monkeypatch.setitem(sys.modules, name_i, types.ModuleType(name_i))
    setattr(sys.modules[module], name, cls)
    return cls


def forget(monkeypatch, *prefixes):
    for m in [m for m in sys.modules if m.startswith(prefixes)]:
        monkeypatch.delitem(sys.modules, m)


@pytest.mark.parametrize("fmt", [{}, LEGACY], ids=["zip", "legacy"])
def test_shell_command_pickle_is_refused_and_not_run(tmp_path, fmt):
    marker = tmp_path / "MARKER"
    torch.save({"state_dict": {"w": torch.ones(1)}, "evil": _RunsShell(marker)}, tmp_path / "evil.ckpt", **fmt)
    with pytest.raises(ValueError, match=r"contains pickled code \((posix|nt|os)\.system\) that weights_only "
                                         r"loading refuses; it was not executed\. If you trust the file, convert it"):
        safe_load(tmp_path / "evil.ckpt")
    assert not marker.exists()


@pytest.mark.parametrize("fmt", [{}, LEGACY], ids=["zip", "legacy"])
def test_eval_pickle_is_refused(tmp_path, monkeypatch, fmt):
    monkeypatch.chdir(tmp_path)
    torch.save([_RunsEval()], tmp_path / "e.pt", **fmt)
    with pytest.raises(ValueError, match=r"\(builtins\.eval\)"):
        safe_load(tmp_path / "e.pt")
    assert not (tmp_path / "EVAL_RAN").exists()


def test_code_hidden_beside_allowed_metadata_is_still_refused(tmp_path, monkeypatch):
    AttributeDict = fake_class(monkeypatch, "pytorch_lightning.utilities.parsing.AttributeDict", dict)
    torch.save({"hyper_parameters": AttributeDict(a=1), "x": _RunsShell(tmp_path / "M")}, tmp_path / "mixed.ckpt")
    with pytest.raises(ValueError, match="system"):
        safe_load(tmp_path / "mixed.ckpt")
    assert not (tmp_path / "M").exists()


@pytest.mark.parametrize("fmt", [{}, LEGACY], ids=["zip", "legacy"])
def test_lightning_checkpoint_loads_without_lightning(tmp_path, monkeypatch, fmt):
    AttributeDict = fake_class(monkeypatch, "pytorch_lightning.utilities.parsing.AttributeDict", dict)
    ModelCheckpoint = fake_class(monkeypatch, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")
    weights = collections.OrderedDict(w=torch.randn(2, 3), b=torch.arange(4))
    weights._metadata = {"": {"version": 1}}
    ckpt = {
        "epoch": 3, "global_step": 100, "pytorch-lightning_version": "1.0.8", "state_dict": weights,
        "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 1e-4}]}],
        # PL 1.0 keys callback states by the callback's class
        "callbacks": {ModelCheckpoint: {"best_model_path": pathlib.Path("/ckpts/last.ckpt"),
                                        "best_model_score": torch.tensor(0.5)}},
        "hyper_parameters": AttributeDict(n_embed=1024, ddconfig={"ch": 128}, args=argparse.Namespace(seed=23)),
    }
    torch.save(ckpt, tmp_path / "last.ckpt", **fmt)
    forget(monkeypatch, "pytorch_lightning")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Lightning's classes become plain data without loss: no warning
        obj = safe_load(tmp_path / "last.ckpt")
    assert "pytorch_lightning" not in sys.modules  # nothing was imported
    assert list(obj["state_dict"]) == ["w", "b"] and torch.equal(obj["state_dict"]["w"], weights["w"])
    assert obj["state_dict"]._metadata == weights._metadata  # state_dict containers are kept as they are
    assert obj["hyper_parameters"] == {"n_embed": 1024, "ddconfig": {"ch": 128}, "args": {"seed": 23}}
    assert type(obj["hyper_parameters"]) is dict
    (key, cb), = obj["callbacks"].items()
    assert key == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    assert str(cb["best_model_path"]) == "/ckpts/last.ckpt" and float(cb["best_model_score"]) == 0.5
    assert obj["optimizer_states"][0]["param_groups"][0]["lr"] == 1e-4 and obj["global_step"] == 100


def test_omegaconf_hyper_parameters_become_plain_containers(tmp_path, monkeypatch):
    """omegaconf's pickled layout: containers with `_content`, nodes with `_val`, metadata holding
    types (dict, typing.Any) and a defaultdict, nodes pointing back at their parent."""
    Meta = fake_class(monkeypatch, "omegaconf.base.ContainerMetadata")
    NodeMeta = fake_class(monkeypatch, "omegaconf.base.Metadata")
    AnyNode = fake_class(monkeypatch, "omegaconf.nodes.AnyNode")
    DictConfig = fake_class(monkeypatch, "omegaconf.dictconfig.DictConfig")
    ListConfig = fake_class(monkeypatch, "omegaconf.listconfig.ListConfig")

    def meta(cls, **kw):
        m = cls()
        m.__dict__.update(ref_type=typing.Any, object_type=dict, key_type=typing.Any, flags={},
                          resolver_cache=collections.defaultdict(dict), **kw)
        return m

    def wrap(value, parent):
        if isinstance(value, (dict, list)):
            node = DictConfig() if isinstance(value, dict) else ListConfig()
            items = value.items() if isinstance(value, dict) else enumerate(value)
            content = {k: wrap(v, node) for k, v in items}
            node.__dict__.update(_metadata=meta(Meta), _parent=parent,
                                 _content=content if isinstance(value, dict) else list(content.values()))
            return node
        node = AnyNode()
        node.__dict__.update(_metadata=meta(NodeMeta, key=None), _parent=parent, _val=value)
        return node

    params = {"n_embed": 16384, "ddconfig": {"ch_mult": [1, 1, 2], "double_z": False, "dropout": 0.0}}
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": wrap(params, None)}, tmp_path / "oc.ckpt")
    forget(monkeypatch, "omegaconf")
    with pytest.warns(UserWarning, match=r"omegaconf metadata read as plain dicts.*omegaconf\.dictconfig\.DictConfig"):
        obj = safe_load(tmp_path / "oc.ckpt")
    assert obj["hyper_parameters"] == params and "omegaconf" not in sys.modules


def test_plain_safetensors_and_missing_files(tmp_path):
    from safetensors.torch import save_file

    torch.save({"a": torch.arange(3)}, tmp_path / "p.pt")
    assert torch.equal(safe_load(tmp_path / "p.pt")["a"], torch.arange(3))
    save_file({"b": torch.ones(2)}, str(tmp_path / "w.safetensors"))
    assert torch.equal(safe_load(tmp_path / "w.safetensors")["b"], torch.ones(2))
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        safe_load(tmp_path / "missing.pt")
