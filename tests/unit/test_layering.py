"""The package's layering (README, Architecture): single-device model and loss code, no import
cycles between sub-packages, and only engine code touching wrapper internals."""
import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "taming_dist"
DISTRIBUTED = ("torch.distributed", "deepspeed", "taming_dist.engines", "taming_dist.train", "taming_dist.tasks")


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def _files(*subpackages):
    return [f for sub in subpackages for f in (PKG / sub).glob("*.py")]


def _bad(files, forbidden):
    return [(f"{f.parent.name}/{f.name}", m) for f in files for m in _imports(f) if m.startswith(forbidden)]


def package_graph() -> dict[str, set[str]]:
    """Sub-package -> the sub-packages it imports (module-level and lazy imports alike)."""
    edges: dict[str, set[str]] = {}
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG).parts
        src = rel[0] if len(rel) > 1 else rel[0][:-3]
        for m in _imports(f):
            if m.startswith("taming_dist."):
                dst = m.split(".")[1]
                if dst != src:
                    edges.setdefault(src, set()).add(dst)
    return edges


def find_cycle(edges: dict[str, set[str]]):
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [node])
                if found:
                    return found
        state[node] = 2
        return None

    for n in sorted(edges):
        if n not in state:
            found = visit(n, [])
            if found:
                return found
    return None


def test_models_and_losses_never_import_distributed_code():
    files = _files("models", "losses")
    assert len(files) >= 6
    bad = _bad(files, DISTRIBUTED)
    assert not bad, f"single-device code imports distributed modules: {bad}"


def test_models_and_losses_never_import_checkpoint_code():
    # from_pretrained and LPIPS's safe loading go through the leaf package taming_dist/weights
    bad = _bad(_files("models", "losses"), ("taming_dist.checkpoint",))
    assert not bad, bad


def test_tasks_and_checkpoint_do_not_import_each_other():
    assert not _bad(_files("tasks"), ("taming_dist.checkpoint",))
    assert not _bad(_files("checkpoint"), ("taming_dist.tasks",))


def test_weights_is_a_leaf():
    files = _files("weights")
    assert files
    # taming_dist.atomic (the one atomic writer) imports nothing of taming_dist: a leaf too.
    bad = [(f.name, m) for f in files for m in _imports(f) if m.startswith("taming_dist.")
           and not m.startswith(("taming_dist.config", "taming_dist.weights", "taming_dist.atomic"))]
    assert not bad, bad
    assert not [m for m in _imports(PKG / "atomic.py") if m.startswith("taming_dist")]


def test_no_import_cycles_between_subpackages():
    assert find_cycle(package_graph()) is None, find_cycle(package_graph())


def file_graph(package: str) -> dict[str, set[str]]:
    """File -> the files of the same sub-package it imports (module-level and lazy imports alike)."""
    edges: dict[str, set[str]] = {}
    for f in (PKG / package).glob("*.py"):
        for m in _imports(f):
            parts = m.split(".")
            if parts[:2] == ["taming_dist", package] and len(parts) > 2 and parts[2] != f.stem:
                edges.setdefault(f.stem, set()).add(parts[2])
    return edges


def test_no_import_cycles_between_files_of_one_package():
    packages = sorted(d.name for d in PKG.iterdir() if d.is_dir() and (d / "__init__.py").exists())
    assert {"models", "launch", "engines"} <= set(packages)
    cycles = {p: c for p in packages if (c := find_cycle(file_graph(p)))}
    assert not cycles, f"import cycles between files (a lazy import inside a function counts too): {cycles}"
    assert "vqgan" in file_graph("models")["transformer"]  # the graph sees the package's own imports


def test_the_cycle_check_can_fail():
    assert find_cycle({"models": {"checkpoint"}, "checkpoint": {"models"}}) == ["checkpoint", "models", "checkpoint"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None


def test_tasks_never_touch_wrapper_internals():
    for f in (PKG / "tasks").glob("*.py"):
        text = f.read_text()
        for needle in ("deepspeed", "DistributedDataParallel", "fully_shard", "ds_tensor", "to_local", "no_sync",
                       "isinstance"):
            assert needle not in text, f"{f.name} mentions {needle}: only engine code may (blocks come from the model)"


def _condition_kind_dispatch(path: Path) -> list[int]:
    """Lines of `path` that compare a condition's kind (`condition.kind == ...`, `cond.kind in (...)`,
    or a name assigned from `....condition.kind` and then compared)."""
    tree = ast.parse(path.read_text())

    def is_cond_kind(node) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "kind"
                and "cond" in ast.unparse(node.value).lower())

    names = {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) and is_cond_kind(n.value)
             for t in n.targets if isinstance(t, ast.Name)}
    names |= {e.id for n in ast.walk(tree) if isinstance(n, ast.Assign) and isinstance(n.value, ast.Tuple)
              for t in n.targets if isinstance(t, ast.Tuple)
              for e, v in zip(t.elts, n.value.elts) if isinstance(e, ast.Name) and is_cond_kind(v)}
    hits = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Compare):
            sides = [n.left, *n.comparators]
            if any(is_cond_kind(x) or (isinstance(x, ast.Name) and x.id in names) for x in sides):
                hits.append(n.lineno)
    return hits


def test_only_the_condition_factory_dispatches_on_the_condition_kind():
    # issue 23: one class per condition kind (models/conditions.py); a new kind touches that file only
    allowed = {PKG / "models" / "conditions.py"}
    bad = {str(f.relative_to(PKG)): lines for f in PKG.rglob("*.py") if f not in allowed
           for lines in [_condition_kind_dispatch(f)] if lines}
    assert not bad, f"condition.kind dispatch outside models/conditions.py (use the condition object): {bad}"


def test_the_condition_dispatch_check_can_fail(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("kind = cfg.condition.kind\nif kind == 'class':\n    pass\nif cond.kind in ('a',):\n    pass\n")
    assert _condition_kind_dispatch(f) == [2, 4]


ENGINE_WORDS = re.compile(r"\b(deepspeed|fsdp|ddp|zero[-_ ]?[123])\b", re.IGNORECASE)


def engine_knowledge(path: Path) -> list[str]:
    """Places in `path` that know a particular engine: a string naming one (docstrings and comments
    aside: they may explain), a `ds_*` attribute, or an import of one engine's module."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if ENGINE_WORDS.search(node.value):
                found.append(f"{path.name}:{node.lineno} string {node.value[:60]!r}")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("ds_"):
            found.append(f"{path.name}:{node.lineno} attribute {node.attr}")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for m in names:
                if m.startswith(("deepspeed", "taming_dist.engines.deepspeed", "taming_dist.engines.torch_engine",
                                 "taming_dist.engines.parallelize")):
                    found.append(f"{path.name}:{node.lineno} import {m}")
    return found


def test_no_engine_is_named_outside_engines():
    """The loop, the tasks, the checkpoint code and the planner ask an engine (describe,
    manifest_fields, ...) or the functions of engines/__init__.py keyed by kind (planned_bytes,
    consolidate, param_count), and never branch on one."""
    files = _files("train", "checkpoint", "tasks") + [PKG / "plan.py"]
    found = [hit for f in files for hit in engine_knowledge(f)]
    assert not found, found


def test_the_engine_name_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('''"""Docstrings may say deepspeed."""
import deepspeed
def f(p, cfg):
    # so may comments: fsdp
    return p.ds_numel if cfg.kind == "deepspeed" else 0
''')
    assert [h.split(" ", 1)[1] for h in engine_knowledge(bad)] == [
        "import deepspeed", "attribute ds_numel", "string 'deepspeed'"]


# issue 22 (part 5): the collectives (models/collectives.py) reach model code through constructors
COLLECTIVE_ATTRS = {"reduce_fn", "broadcast_fn", "dp_rank", "dp_size", "collectives"}


def collective_assignments(path: Path) -> list[int]:
    """Lines of `path` that hand a module its collectives after construction: an assignment to an
    attribute named reduce_fn, broadcast_fn, dp_rank, dp_size or collectives, other than
    `self.collectives = ...` inside an `__init__`, or a call of `set_reduce_fn`."""
    tree = ast.parse(path.read_text())
    allowed = {id(t) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "__init__"
               for n in ast.walk(f) for t in ast.walk(n)
               if isinstance(t, ast.Attribute) and isinstance(t.ctx, ast.Store) and t.attr == "collectives"
               and ast.unparse(t.value) == "self"}
    hits = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and n.attr in COLLECTIVE_ATTRS \
                and id(n) not in allowed:
            hits.append(n.lineno)
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "set_reduce_fn":
            hits.append(n.lineno)
    return sorted(hits)


def test_collectives_are_never_assigned_after_construction():
    bad = {str(f.relative_to(PKG)): lines for f in PKG.rglob("*.py") for lines in [collective_assignments(f)] if lines}
    assert not bad, f"collectives handed over after construction (pass collectives= to the constructor): {bad}"


def test_the_collective_assignment_check_can_fail(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("class Q:\n    def __init__(self, c):\n        self.collectives = c\n"
                 "model.quantize.reduce_fn = fn\nq.broadcast_fn, q.dp_rank = f, 0\nd.set_reduce_fn(fn)\n"
                 "def later(self, c):\n    self.collectives = c\n")
    assert collective_assignments(f) == [4, 5, 5, 6, 8]


def test_the_vqgan_task_builds_its_models_with_the_engines_collectives():
    tree = ast.parse((PKG / "tasks" / "vqgan.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and n.func.id in ("VQModel", "NLayerDiscriminator")]
    assert len(calls) == 2 and all("collectives" in {k.arg for k in c.keywords} for c in calls)


def test_the_quantizer_kind_is_dispatched_only_by_the_config_and_the_factory():
    # QuantizerConfig.validate checks the kind and its options; models/quantize.py maps it to a class.
    # (The exporters' format tables, checkpoint/ and interop/, say which kinds a format can hold.)
    kinds = {"vq", "ema", "gumbel", "l2", "fsq", "lfq"}
    files = _files("models", "tasks", "losses", "train", "engines")
    hits = [f"{f.name}:{n.lineno}" for f in files for n in ast.walk(ast.parse(f.read_text()))
            if isinstance(n, ast.Compare) and (kinds & {c.value for c in ast.walk(n) if isinstance(c, ast.Constant)}
                                               or re.search(r"\bq(uantizer)?\.kind\b", ast.unparse(n)))]
    assert not hits, f"quantizer kind compared outside the config's validation (ask the quantizer class): {hits}"
