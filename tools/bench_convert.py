"""Peak memory (RSS) and time of `taming-dist convert` on a training checkpoint: model-only reads vs
the whole checkpoint.

Builds a GPT unit with the single-process engine, takes one AdamW step on a tiny random batch (so
the optimizer's exp_avg and exp_avg_sq exist: the checkpoint is then about 3x the model, 4x with
--ema) and saves it with the CheckpointManager. Then each method runs in a fresh process, so that
its peak RSS (VmHWM; see max_rss_bytes) is its own, less the RSS of the process after its imports:
  model-only        `taming_dist.checkpoint.convert.consolidate`: reads only the `<unit>.model.*`
                    (and `<unit>.ema.*`) tensors of the DCP state, never the optimizer state
  whole-checkpoint  what convert did before: `dcp_to_torch_save(state, tmp.pt)`, `torch.load`, then
                    pick the model tensors (the whole state, optimizer included, is held in memory:
                    by dcp_to_torch_save, then by torch.load)
Stage `load` is the consolidation alone; stage `convert` is the whole command
(`taming_dist.commands.convert.run`: consolidation + the safetensors file; for whole-checkpoint with
the old consolidation patched in). Every run's tensors are hashed; all must be identical.

    python tools/bench_convert.py [--params 300M] [--ema] [--stages load convert] [--json out.json]
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

METHODS = ("model-only", "whole-checkpoint")
STAGES = ("load", "convert")
GIB = 2**30


def parse_count(text: str) -> int:
    """'300M', '1.2B', '5k', '4096' -> an integer."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbBgG]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count such as 300M, 1.2B, 5k or 4096")
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def gpt_config(args):
    """The GPTConfig of the requested size: --n-layer if given, else the layer count that brings
    the model closest to --params at this width (counted on the meta device, nothing allocated)."""
    from taming_dist.config import GPTConfig
    from taming_dist.models.gpt import GPT

    def cfg(n_layer):
        return GPTConfig(vocab_size=args.vocab, block_size=args.block, n_layer=n_layer,
                         n_head=args.n_head or max(1, args.n_embd // 64), n_embd=args.n_embd)

    if args.n_layer is not None:
        return cfg(args.n_layer)
    with torch.device("meta"):
        base, one = GPT(cfg(0)).num_params(), GPT(cfg(1)).num_params()
    return cfg(max(1, round((args.params - base) / (one - base))))


def make_checkpoint(folder: Path, cfg, ema: bool) -> tuple[Path, int]:
    """A one-step training checkpoint of a GPT unit; returns (checkpoint folder, parameter count)."""
    import torch.nn.functional as F

    from taming_dist.checkpoint.manager import CheckpointManager
    from taming_dist.checkpoint.state import TrainState, training_state
    from taming_dist.config import EngineConfig, OptimConfig
    from taming_dist.engines import DistEnv, build_engine, lr_lambda_for
    from taming_dist.models.gpt import GPT

    torch.manual_seed(0)
    engine = build_engine(EngineConfig(kind="single"), DistEnv(), torch.device("cpu"))
    oc = OptimConfig(lr=1e-4, betas=[0.9, 0.95], weight_decay=0.01)
    unit = engine.setup(GPT(cfg), name="transformer", optim=oc, lr=oc.lr, lr_lambda=lr_lambda_for(oc, 10),
                        ema_decay=0.999 if ema else 0.0)
    n_params = unit.raw.num_params()
    idx = torch.randint(cfg.vocab_size, (2, min(cfg.block_size, 16)))
    logits = unit.module(idx[:, :-1])
    engine.backward(unit, F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()))
    engine.step(unit)  # allocates Adam's exp_avg / exp_avg_sq for every parameter
    state = training_state(engine, {"transformer": unit}, TrainState(step=1))
    path = CheckpointManager(folder / "checkpoints", engine).save(1, state)
    return path, n_params


def checkpoint_breakdown(ckpt: Path) -> dict[str, int]:
    """Bytes of the DCP state's tensors by kind (model, optim, ema, other), from its metadata."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    out = {"model": 0, "optim": 0, "ema": 0, "other": 0}
    meta = dcp.FileSystemReader(str(ckpt / "state")).read_metadata().state_dict_metadata
    for key, m in meta.items():
        if isinstance(m, TensorStorageMetadata):
            kind = key.split(".")[1] if key.count(".") else "other"
            n = torch.Size(m.size).numel() * torch.empty((), dtype=m.properties.dtype).element_size()
            out[kind if kind in out else "other"] += n
    return out


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def warm_page_cache(path: Path) -> None:
    # Both methods then read the checkpoint from memory; the first run is not charged for the disk.
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(64 * 2**20):
                    pass


# -- worker: one method, one stage, in a fresh process ------------------------------------------
def whole_checkpoint_consolidate(path, *, ema: bool = False, dtype=None) -> dict[str, dict]:
    """The previous `consolidate` of torch engines' checkpoints, on today's layout: the whole DCP
    state (optimizer included) written to one torch.save file, loaded back, model tensors picked."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from taming_dist.checkpoint.convert import resolve_checkpoint
    from taming_dist.checkpoint.manager import read_manifest

    ckpt = resolve_checkpoint(path)
    # The temporary file sits beside the checkpoint (on disk) so that a tmpfs /tmp cannot hold it in RAM.
    with tempfile.TemporaryDirectory(dir=ckpt.parent) as tmp:
        dcp_to_torch_save(ckpt / "state", Path(tmp) / "full.pt")
        # weights_only works: the non-tensor items (schedule, run state) are bytes and ints.
        state = torch.load(Path(tmp) / "full.pt", weights_only=True)
    result = {}
    for name in read_manifest(ckpt)["units"]:
        sd = dict(state[name]["model"])
        if ema and state[name].get("ema"):
            sd.update(state[name]["ema"])
        result[name] = sd
    if dtype is not None:
        result = {u: {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
                  for u, sd in result.items()}
    return result


def tensor_digest(flat: dict[str, torch.Tensor]) -> dict:
    """sha256 over every tensor's key, dtype, shape and bytes (in key order), and the sum of the
    tensors' float64 sums: identical tensors give identical digests."""
    h = hashlib.sha256()
    total = 0.0
    for k in sorted(flat):
        t = flat[k].detach().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(memoryview(t.view(-1).view(torch.uint8).numpy()))
        total += float(t.double().sum()) if t.is_floating_point() else float(t.sum())
    return {"sha256": h.hexdigest(), "sum": total, "tensors": len(flat)}


def max_rss_bytes() -> int:
    """This process's peak RSS. Linux: VmHWM, the high-water mark of this program's own memory.
    getrusage's ru_maxrss is not that: it is kept across fork and exec, so a worker started by a
    parent that held the training unit would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def worker(spec: dict) -> None:
    # Everything either method needs is imported before the baseline, so the difference is the work.
    from argparse import Namespace

    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.checkpoint.format_utils  # noqa: F401
    from safetensors.torch import load_file

    import taming_dist.checkpoint.convert as convert_mod
    import taming_dist.commands.convert as convert_cmd

    baseline = max_rss_bytes()
    consolidate = convert_mod.consolidate if spec["method"] == "model-only" else whole_checkpoint_consolidate
    t0 = time.perf_counter()
    if spec["stage"] == "load":
        units = consolidate(spec["ckpt"], ema=spec["ema"])
        wall, peak = time.perf_counter() - t0, max_rss_bytes()
        flat = {f"{u}.{k}": v for u, sd in units.items() for k, v in sd.items()}
    else:
        out = Path(spec["result"]).with_suffix(".safetensors")
        # The command imports consolidate from the module when it runs: patching the module swaps the method.
        convert_mod.consolidate = consolidate
        convert_cmd.run(Namespace(checkpoint=spec["ckpt"], out=str(out), dtype=None, ema=spec["ema"]))
        wall, peak = time.perf_counter() - t0, max_rss_bytes()
        flat = load_file(str(out))  # read after the peak was taken
        out.unlink()
    result = {"baseline_rss": baseline, "peak_rss": peak, "added_rss": peak - baseline, "wall_s": wall,
              **tensor_digest(flat)}
    Path(spec["result"]).write_text(json.dumps(result))


def run_worker(method: str, stage: str, ckpt: Path, ema: bool, work: Path) -> dict:
    result = work / f"result_{method}_{stage}.json"
    spec = {"method": method, "stage": stage, "ckpt": str(ckpt), "ema": ema, "result": str(result)}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{method}/{stage} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return json.loads(result.read_text())


# -- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=parse_count, default=parse_count("300M"),
                   help="target parameter count (sets the layer count at --n-embd), e.g. 300M, 1.2B")
    p.add_argument("--n-layer", type=int, default=None, help="layer count (overrides --params)")
    p.add_argument("--n-embd", type=int, default=1024)
    p.add_argument("--n-head", type=int, default=None, help="default: n_embd / 64")
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--ema", action="store_true", help="keep an EMA in the run and convert with --ema")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                   help="load: the consolidation alone; convert: the whole command, safetensors file included")
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes at once (RSS figures are per process either way; wall times are "
                        "only comparable with 1)")
    p.add_argument("--dir", default=None,
                   help="where to make the work folder (default: the system's temporary folder); the work folder "
                        "is a new one inside it, removed at the end")
    p.add_argument("--keep", action="store_true", help="keep the work folder (checkpoint and results)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        worker(json.loads(args.worker))
        return {}

    cfg = gpt_config(args)
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    # A new folder even inside --dir, so that removing it at the end removes nothing of the user's.
    work = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.dir))
    try:
        t0 = time.perf_counter()
        ckpt, n_params = make_checkpoint(work, cfg, args.ema)
        save_s = time.perf_counter() - t0
        gc.collect()  # the training unit is gone: the workers below get the machine's memory
        breakdown = checkpoint_breakdown(ckpt)
        disk = folder_bytes(ckpt)
        warm_page_cache(ckpt)
        todo = [(m, s) for m in METHODS for s in args.stages]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            done = list(pool.map(lambda ms: run_worker(*ms, ckpt, args.ema, work), todo))
        runs = {m: {} for m in METHODS}
        for (m, s), r in zip(todo, done):
            runs[m][s] = r
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    digests = {(r["sha256"], r["tensors"]) for stages in runs.values() for r in stages.values()}
    report = {
        "gpt": {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head, "vocab_size": cfg.vocab_size,
                "block_size": cfg.block_size},
        "params": n_params, "ema": args.ema, "model_fp32_bytes": n_params * 4, "checkpoint_bytes": disk,
        "checkpoint_tensor_bytes": breakdown, "save_s": save_s, "cpus": os.cpu_count(),
        "torch": torch.__version__, "jobs": args.jobs, "methods": runs, "tensors_match": len(digests) == 1,
    }

    g = lambda b: b / GIB  # noqa: E731
    print(f"GPT {cfg.n_layer} layers x {cfg.n_embd} wide, vocab {cfg.vocab_size}, block {cfg.block_size}: "
          f"{n_params / 1e6:.1f} M params, {g(n_params * 4):.3f} GiB fp32{' + EMA' if args.ema else ''}")
    print(f"checkpoint on disk {g(disk):.3f} GiB (tensors: model {g(breakdown['model']):.3f}, optim "
          f"{g(breakdown['optim']):.3f}, ema {g(breakdown['ema']):.3f}, other {g(breakdown['other']):.3f}); "
          f"saved in {save_s:.1f} s; {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"{'method':<17}{'stage':<9}{'wall s':>8}{'peak GiB':>10}{'baseline GiB':>14}{'added GiB':>11}"
          f"{'x model':>9}  sha256")
    for m, stages in runs.items():
        for s, r in stages.items():
            print(f"{m:<17}{s:<9}{r['wall_s']:>8.2f}{g(r['peak_rss']):>10.3f}{g(r['baseline_rss']):>14.3f}"
                  f"{g(r['added_rss']):>11.3f}{r['added_rss'] / (n_params * 4):>9.2f}  {r['sha256'][:12]}")
    print(f"tensors identical across all runs: {'yes' if report['tensors_match'] else 'NO'} "
          f"({', '.join(str(n) for _, n in digests)} tensors per run)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
