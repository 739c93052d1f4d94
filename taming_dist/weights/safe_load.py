"""Load checkpoint files without running code from them.

safetensors files hold plain tensors. Every other file goes through PyTorch's weights-only
unpickler (`torch.load(weights_only=True)`), which only builds tensors and plain containers and
calls only allow-listed globals.

PyTorch-Lightning checkpoints (the original taming releases) also pickle metadata classes:
Lightning's `AttributeDict`, the `ModelCheckpoint` callback class (a key of `callbacks`),
`argparse.Namespace`, omegaconf's `DictConfig`/`ListConfig` and the typing/builtin types their
metadata refers to. Their globals are allow-listed under those exact names, mapped to inert
stand-ins that only record the state the pickle hands them (Lightning need not be installed, and
none of its code runs); the stand-ins are then turned into plain dicts, lists and strings. Any other
global (os.system, builtins.eval, subprocess.Popen, ...) is refused before anything is unpickled.
"""
from __future__ import annotations

import pathlib
import pickle
import re
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

# Namespaces of the metadata classes in Lightning checkpoints (never needed for weights), and of the
# typing names that omegaconf's metadata refers to.
METADATA_PREFIXES = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.", "typing.")
METADATA_NAMES = frozenset({
    "argparse.Namespace",
    "collections.defaultdict",  # omegaconf's resolver cache
    # Types that omegaconf metadata refers to (object_type, key_type): kept as names, never called.
    "builtins.dict", "builtins.list", "builtins.tuple", "builtins.str", "builtins.int", "builtins.float",
    "builtins.bool", "builtins.bytes", "builtins.object",
})
# Paths (e.g. ModelCheckpoint.dirpath) rebuild as pure paths: no file-system access, no code.
PATH_CLASSES = {
    f"{module}.{kind}{cls}": getattr(pathlib, f"Pure{cls}")
    for module in ("pathlib", "pathlib._local") for kind in ("", "Pure") for cls in ("PosixPath", "WindowsPath")
}
_GLOBAL_IN_ERROR = re.compile(r"GLOBAL ([\w.]+)")
# A file that is not zip-based (the pre-1.6 torch format) cannot be scanned for its globals
# beforehand; stand-ins are then added one refusal at a time, up to this many.
_MAX_RETRIES = 64


def is_metadata_global(name: str) -> bool:
    return name.startswith(METADATA_PREFIXES) or name in METADATA_NAMES or name in PATH_CLASSES


def _refused(path, names) -> ValueError:
    return ValueError(
        f"{path} contains pickled code ({', '.join(sorted(names))}) that weights_only loading refuses; it was not "
        "executed. If you trust the file, convert it in a trusted environment: load it there with "
        "torch.load(path, weights_only=False) and save its state_dict with safetensors.torch.save_file"
    )


class _Records:
    """Stand-in classes for one load. Constructing one (pickle's REDUCE or NEWOBJ) returns an empty
    OrderedDict: the one container type that the weights-only unpickler lets both SETITEMS (dict
    subclasses such as AttributeDict) and BUILD (objects' `__dict__` state) fill. Each record is
    remembered with its class name so that `plain` can turn it into ordinary data afterwards."""

    def __init__(self):
        self.made: dict[int, tuple[OrderedDict, str, tuple]] = {}
        self.classes: dict[str, type] = {}

    def stand_in(self, name: str):
        if name in PATH_CLASSES:
            return PATH_CLASSES[name]
        if name not in self.classes:
            made = self.made

            def __new__(cls, *args, **kwargs):
                record = OrderedDict()
                made[id(record)] = (record, name, args)
                return record

            module, _, qualname = name.rpartition(".")
            self.classes[name] = type(qualname, (), {"__new__": __new__, "__module__": module,
                                                     "qualified_name": name})
        return self.classes[name]

    def plain(self, obj, _memo=None):
        """Replace records by plain data: omegaconf containers by their content, nodes by their
        value, other objects by a dict of their items and attributes, stand-in classes by their name.
        Containers holding no record are returned as they are (a state_dict keeps its `_metadata`)."""
        memo = {} if _memo is None else _memo
        if torch.is_tensor(obj) or isinstance(obj, (str, bytes, int, float, bool, type(None))):
            return obj
        if isinstance(obj, type) and hasattr(obj, "qualified_name"):
            return obj.qualified_name
        key = id(obj)
        if key in memo:
            return memo[key]
        if key in self.made:
            record, name, args = self.made[key]
            memo[key] = f"<{name}>"  # a reference cycle (omegaconf nodes point to their parent) ends here
            attrs = vars(record)
            if name.startswith("omegaconf.") and ("_content" in attrs or "_val" in attrs):
                out = self.plain(attrs.get("_content", attrs.get("_val")), memo)
            else:
                out = {self.plain(k, memo): self.plain(v, memo) for k, v in [*record.items(), *attrs.items()]}
                if args and not out:
                    out = self.plain(args[0] if len(args) == 1 else list(args), memo)
            memo[key] = out
            return out
        if isinstance(obj, dict):
            items = [(self.plain(k, memo), self.plain(v, memo)) for k, v in obj.items()]
            if all(a is k and b is v for (a, b), (k, v) in zip(items, obj.items())):
                out = obj
            else:
                out = type(obj)(items) if type(obj) in (dict, OrderedDict) else dict(items)
        elif isinstance(obj, (list, tuple)):
            values = [self.plain(v, memo) for v in obj]
            out = obj if all(a is b for a, b in zip(values, obj)) else type(obj)(values)
        else:
            out = obj
        memo[key] = out
        return out


def _scan_globals(path: Path) -> set[str] | None:
    """Globals of a zip-format torch file outside torch's own allow-list, read without unpickling;
    None when the file cannot be scanned (the legacy format)."""
    try:
        return set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except (ValueError, pickle.UnpicklingError, RuntimeError):
        return None


def safe_load(path: str | Path, map_location="cpu"):
    """The object in a checkpoint file, loaded without running code from it (see the module doc)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=str(map_location))
    names = _scan_globals(path)
    if names is not None:
        refused = {n for n in names if not is_metadata_global(n)}
        if refused:
            raise _refused(path, refused)
    records = _Records()
    wanted = set(names or ())
    for _ in range(_MAX_RETRIES):
        safe = [(records.stand_in(n), n) for n in sorted(wanted)]
        try:
            with torch.serialization.safe_globals(safe):
                obj = torch.load(path, map_location=map_location, weights_only=True)
            break
        except pickle.UnpicklingError as e:
            found = _GLOBAL_IN_ERROR.search(str(e))
            # torch's message names builtins without their module ("GLOBAL eval")
            name = found and (found.group(1) if "." in found.group(1) else f"builtins.{found.group(1)}")
            if name is None or name in wanted:
                reason = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
                raise ValueError(
                    f"{path} could not be loaded with weights_only=True ({reason}); nothing in it was executed. If you "
                    "trust the file, convert it in a trusted environment (torch.load with weights_only=False, then "
                    "safetensors.torch.save_file of its state_dict)") from None
            if not is_metadata_global(name):
                raise _refused(path, [name]) from None
            wanted.add(name)
    else:
        raise ValueError(f"{path} pickles more than {_MAX_RETRIES} metadata classes; convert it to safetensors")
    if records.made or records.classes:
        lossy = sorted(n for n in set(records.classes) | {n for _, n, _ in records.made.values()}
                       if n.startswith("omegaconf."))
        if lossy:
            warnings.warn(f"{path}: omegaconf metadata read as plain dicts and lists through inert stand-ins (not "
                          f"imported, no code ran); their type annotations and flags are dropped: {', '.join(lossy)}",
                          stacklevel=2)
        obj = records.plain(obj)
    return obj
