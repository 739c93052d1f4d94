HELP = ("consolidate a training checkpoint of any engine (DeepSpeed ZeRO-1/2/3, FSDP2/DCP, single/DDP) "
        "into one safetensors file, on a CPU machine with no process group")
EXAMPLE = "taming-dist convert runs/big/checkpoints/step_010000 big_step10k.safetensors --dtype bf16"


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="checkpoint folder, a run's checkpoints/ folder or a run folder (latest)")
    parser.add_argument("out", help="output .safetensors file; keys are <unit>.<parameter>")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="cast floating tensors")
    parser.add_argument("--ema", action="store_true", help="EMA weights in place of the raw ones (if the run kept them)")


def run(args) -> int:
    import torch
    from safetensors.torch import save_file

    from taming_dist.checkpoint.convert import consolidate
    from taming_dist.weights.folder import safetensors_state

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
    units = consolidate(args.checkpoint, ema=args.ema, dtype=dtype)
    # Copies only where tensors share storage (safetensors refuses that), not the whole model again.
    flat = safetensors_state({f"{u}.{k}": v for u, sd in units.items() for k, v in sd.items()})
    save_file(flat, args.out)
    counts = ", ".join(f"{u}: {len(sd)} tensors" for u, sd in units.items())
    print(f"wrote {args.out} ({counts})")
    return 0
