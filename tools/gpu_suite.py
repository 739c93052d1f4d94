"""The benchmarks of the GPU suite (`bash tools/gpu_suite.sh` runs the GPU tests, then this).

One process, one GPU, random weights and data, no network:
  vqgan   vqgan-f16-16384's architecture at 256 px, both units, GAN terms on (LPIPS with a random
          backbone: the same FLOPs as VGG16): images/s, MFU, peak memory for fp32 / bf16, compile
          off/on, channels_last off/on
  gpt     a gpt-cin-1.4b-like GPT (the preset's widths, --gpt-layers deep) on pre-extracted codes,
          bf16, compile off/on: tokens/s, MFU, peak memory
  decode  KV-cached sampling of 256 tokens, eager vs compiled, at batch 1 / 16 / 64: tokens/s
Prints each row as it ends, then the table; writes the JSON (--json) after every row, so a run stopped
by its time limit keeps what it measured; a bench that fails is a FAILED row and the others still run.
`--dry-run` runs the same code on the CPU at tiny sizes (vqgan-tiny, gpt-cin-1.4b's preset at 2x64,
a 2x64 decoding GPT, inductor swapped for the eager backend so it takes seconds):
tests/unit/test_gpu_suite.py runs it, so the suite cannot rot before a GPU is at hand.

Targets for the first GPU run (issue "Speed at cluster scale"): GPT stage >= 50% MFU in bf16;
VQGAN bf16 + compile >= 4x fp32 eager images/s; compiled decoding >= 3x eager.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from taming_dist.config import load_config
from taming_dist.engines import DistEnv, build_engine
from taming_dist.perf import device_peak_flops, mfu
from taming_dist.train.loop import build_task


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(stage, cfg, micro, device, step):
    g = torch.Generator().manual_seed(step)
    if stage == "vqgan":
        s = cfg.vqgan.ddconfig.resolution
        return {"image": (torch.rand(micro, 3, s, s, generator=g) * 2 - 1).to(device)}
    fs = cfg.transformer.first_stage
    n = (fs.ddconfig.resolution // fs.downsample_factor) ** 2
    return {"codes": torch.randint(0, fs.quantizer.n_embed, (micro, n), generator=g).to(device),
            "label": torch.randint(0, cfg.transformer.condition.n_classes, (micro,), generator=g).to(device)}


def train_row(name, preset, overrides, micro, steps, warmup, device, dry):
    stage = "vqgan" if preset.startswith("vqgan") else "transformer"
    common = ["engine.kind=single", f"train.micro_batch_size={micro}", f"train.global_batch_size={micro}",
              "logging.wandb_mode=disabled", "train.image_every=0"]
    if stage == "vqgan":
        common += ["loss.disc_start=0", "loss.lpips_backbone=random"]
    else:  # pre-extracted codes: no first-stage weights to read (the preset names released ones)
        common += ["data.kind=codes", "data.path=unused", "first_stage_ckpt="]
    if dry:
        common += ["engine.compile_backend=eager"]  # dynamo graphs, no codegen: seconds on a CPU
    cfg = load_config(preset, common + list(overrides))
    torch.manual_seed(0)
    engine = build_engine(cfg.engine, DistEnv(), device)
    task = build_task(cfg, engine, 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(warmup):  # compile, cuDNN autotuning, optimizer state allocation
        task.train_step([_batch(stage, cfg, micro, device, step)], step)
    batches = [_batch(stage, cfg, micro, device, warmup + i) for i in range(steps)]
    _sync(device)
    t0 = time.perf_counter()
    for i, b in enumerate(batches):
        task.train_step([b], warmup + i)
    _sync(device)
    step_s = (time.perf_counter() - t0) / steps
    per_sample = task.flops_per_sample()
    peak = device_peak_flops(device, engine.dtype)
    work = micro * (1 if stage == "vqgan" else task.work_per_sample()[1])
    row = {"bench": name, "stage": stage, "config": " ".join(overrides), "micro_batch": micro,
           "step_s": step_s, "rate": work / step_s, "unit": "images/s" if stage == "vqgan" else "tokens/s",
           "tflop_per_step": per_sample * micro / 1e12,
           "mfu": mfu(per_sample * micro, step_s, 1, peak) if peak else None,
           "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    del task, engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def decode_rows(device, dry, batches, tokens, layers, width):
    from taming_dist.config.schema import GPTConfig
    from taming_dist.models.gpt import GPT
    from taming_dist.models.sampling import generate

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=1024, block_size=tokens + 1, n_layer=layers, n_head=max(1, width // 64),
                        n_embd=width)).to(device).eval()
    if device.type == "cuda":
        gpt = gpt.to(torch.bfloat16)
    rows = []
    for batch in batches:
        prefix = torch.zeros(batch, 1, dtype=torch.long, device=device)
        rates = {}
        for compiled in (False, True):
            kw = {"compile": True} if compiled else {}
            generate(gpt, prefix, tokens, top_k=100, generator=torch.Generator(device).manual_seed(0), **kw)  # warm-up
            _sync(device)
            t0 = time.perf_counter()
            generate(gpt, prefix, tokens, top_k=100, generator=torch.Generator(device).manual_seed(0), **kw)
            _sync(device)
            rates[compiled] = batch * tokens / (time.perf_counter() - t0)
        rows.append({"bench": f"decode b{batch}", "stage": "decode", "config": f"{layers}x{width}, {tokens} tokens",
                     "micro_batch": batch, "rate": rates[True], "unit": "tokens/s", "eager_rate": rates[False],
                     "speedup": rates[True] / rates[False]})
    return rows


def benches(dry: bool, device: torch.device, gpt_layers: int = 24) -> list[tuple[str, object]]:
    """(name, function returning its rows), the ones the targets need first: a run cut short by its
    time limit keeps those."""
    s = dict(steps=2, warmup=1) if dry else dict(steps=10, warmup=3)
    vq, vq_micro = ("vqgan-tiny", 2) if dry else ("vqgan-f16-16384", 8)
    res = (["vqgan.ddconfig.resolution=16", "data.size=16"] if dry
           else ["vqgan.ddconfig.resolution=256"])
    lm, lm_micro = "gpt-cin-1.4b", 2 if dry else 8  # the dry run shrinks the same preset (same overrides)
    lm_size = (["transformer.gpt.n_layer=2", "transformer.gpt.n_embd=64", "transformer.gpt.n_head=2"] if dry
               else [f"transformer.gpt.n_layer={gpt_layers}"])

    def train(name, preset, overrides, micro):
        return name, lambda: [train_row(name, preset, overrides, micro, device=device, dry=dry, **s)]

    bf16, comp, cl = "engine.precision=bf16", "engine.compile=true", "engine.channels_last=true"
    decode = (lambda: decode_rows(device, dry, (1, 2), tokens=16, layers=2, width=64)) if dry else \
        (lambda: decode_rows(device, dry, (1, 16, 64), tokens=256, layers=24, width=1536))
    return [train("vqgan fp32", vq, res + ["engine.precision=fp32"], vq_micro),
            train("vqgan bf16", vq, res + [bf16], vq_micro),
            train("vqgan bf16 compile", vq, res + [bf16, comp], vq_micro),
            train("gpt bf16", lm, lm_size + [bf16], lm_micro),
            train("gpt bf16 compile", lm, lm_size + [bf16, comp], lm_micro),
            ("decode", decode),
            train("vqgan bf16 channels_last", vq, res + [bf16, cl], vq_micro),
            train("vqgan bf16 compile channels_last", vq, res + [bf16, comp, cl], vq_micro)]


def _in_child(name: str, gpt_layers: int, limit_s: float, dry: bool = False) -> list[dict]:
    """One bench in a fresh process (not a fork): a crash in CUDA or a compiler (a segfault) then costs
    that row alone, and each bench starts from an empty allocator and compile cache."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        out = f"{d}/rows.json"
        try:
            p = subprocess.run([sys.executable, __file__, "--bench", name, "--rows-to", out,
                                "--gpt-layers", str(gpt_layers), *["--dry-run"] * dry], capture_output=True, text=True, timeout=limit_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"ran past its {limit_s:.0f} s (--bench-limit-s)") from None
        if p.returncode != 0:
            lines = [line for line in p.stderr.strip().splitlines() if line.strip()]
            where = next((line.strip() for line in lines if line.lstrip().startswith('File "')), "")
            raise RuntimeError(f"exit {p.returncode}: {(lines or ['no output'])[-1]}" + (f" (at {where})" * bool(where)))
        return json.loads(open(out).read())


def _guarded(rows, name, fn, progress):
    """Run one bench; a failure becomes a row with its error (the other rows still run), and each row
    is printed and handed to `progress` as it ends, so a run cut short keeps what it measured."""
    try:
        got = fn()
    except Exception as e:  # noqa: BLE001 - one bench's failure (OOM, a compile error) is reported, not fatal
        got = [{"bench": name, "error": f"{type(e).__name__}: {e}"[:500]}]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    for r in got:
        rows.append(r)
        print(table([r], header=False), flush=True)
    progress(rows)


def run_suite(dry: bool, device: torch.device, gpt_layers: int = 24, progress=lambda rows: None,
              isolate: bool = False, limit_s: float = 600) -> list[dict]:
    rows: list[dict] = []
    print(table([]), flush=True)
    for name, fn in benches(dry, device, gpt_layers):
        run = (lambda n=name: _in_child(n, gpt_layers, limit_s, dry)) if isolate else fn
        _guarded(rows, name, run, progress)
    return rows


def summary(rows: list[dict]) -> dict:
    """The targets' ratios, from the rows (None where a row they need failed or did not run)."""
    by = {r["bench"]: r for r in rows if "error" not in r}
    fp32, comp = by.get("vqgan fp32"), by.get("vqgan bf16 compile")
    mfus = [by[b]["mfu"] for b in ("gpt bf16", "gpt bf16 compile") if b in by and by[b].get("mfu") is not None]
    return {"vqgan_bf16_compile_vs_fp32": comp["rate"] / fp32["rate"] if fp32 and comp else None,
            "gpt_bf16_mfu": max(mfus) if mfus else None,
            "decode_speedup": {r["micro_batch"]: r["speedup"] for r in rows if r.get("stage") == "decode"},
            "failed": {r["bench"]: r["error"] for r in rows if "error" in r}}


def table(rows: list[dict], header: bool = True) -> str:
    lines = [f"{'bench':34} {'micro':>5} {'rate':>12} {'unit':9} {'step s':>8} {'MFU':>6} {'peak GiB':>8}  note"] * header
    for r in rows:
        if "error" in r:
            lines.append(f"{r['bench']:34} FAILED: {r['error']}")
            continue
        mfu_s = f"{r['mfu'] * 100:5.1f}%" if r.get("mfu") is not None else "     -"
        mem = f"{r['peak_mem_gib']:8.2f}" if r.get("peak_mem_gib") is not None else "       -"
        note = f"eager {r['eager_rate']:.0f} tok/s, {r['speedup']:.2f}x" if r["stage"] == "decode" else r["config"]
        step = f"{r['step_s']:8.3f}" if "step_s" in r else "       -"
        lines.append(f"{r['bench']:34} {r['micro_batch']:5d} {r['rate']:12.1f} {r['unit']:9} {step} {mfu_s} {mem}  {note}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (what the test runs)")
    p.add_argument("--json", help="write the rows and the summary here")
    p.add_argument("--gpt-layers", type=int, default=24, help="depth of the gpt-cin-1.4b-like GPT (the preset has 48)")
    p.add_argument("--bench-limit-s", type=float, default=600, help="a bench running longer is a FAILED row")
    p.add_argument("--bench", help=argparse.SUPPRESS)  # a child: this one bench, its rows to --rows-to
    p.add_argument("--rows-to", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = torch.device("cpu") if args.dry_run or not torch.cuda.is_available() else torch.device("cuda", 0)
    if not args.dry_run and device.type != "cuda":
        raise SystemExit("no CUDA device: run with --dry-run on a CPU machine")
    if args.bench:
        import faulthandler

        faulthandler.enable()  # a segfault (seen in CUDA compile) prints the Python stack to the parent
        fn = dict(benches(args.dry_run, device, args.gpt_layers))[args.bench]
        with open(args.rows_to, "w") as f:
            json.dump(fn(), f)
        return {}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    head = {"device": name, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}

    def write(rows):  # after every row: a run stopped by its time limit keeps the rows it finished
        if args.json:
            with open(args.json, "w") as f:
                json.dump({**head, "rows": rows, "summary": summary(rows)}, f, indent=2)

    print(f"device: {name}, torch {torch.__version__}", flush=True)
    # On the GPU each bench runs in a process of its own; the dry run stays in this one (seconds).
    rows = run_suite(args.dry_run, device, args.gpt_layers, progress=write, isolate=device.type == "cuda",
                     limit_s=args.bench_limit_s)
    result = {**head, "rows": rows, "summary": summary(rows)}
    print("\n" + table(rows))
    print("summary:", json.dumps(result["summary"]))
    write(rows)
    return result


if __name__ == "__main__":
    main()
