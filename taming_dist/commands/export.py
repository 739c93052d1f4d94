HELP = ("export a run (latest checkpoint), a checkpoint folder or a model folder for inference: ours "
        "(config.json + model.safetensors, EMA weights by default), the original taming layout, diffusers, "
        "transformers, a diffusers + transformers pipeline, or ONNX")
EXAMPLE = "taming-dist export runs/vqgan-f16 exported/vqgan-f16 --dtype bf16"


def add_arguments(parser) -> None:
    parser.add_argument("src", help="run folder, its checkpoints/ folder, one checkpoint folder, or a model folder")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--no-ema", action="store_true", help="raw weights instead of the EMA (when the run kept one)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--format", choices=["taming_dist", "taming", "diffusers", "transformers", "hf-pipeline", "onnx"],
                        default="taming_dist",
                        help="taming: the original Lightning layout (model.ckpt + model.yaml); diffusers: the VQGAN "
                             "(or a transformer's first stage) as a diffusers VQModel; transformers: the GPT as a "
                             "GPT2LMHeadModel; hf-pipeline: both plus a README; onnx: the tokenizer as "
                             "encode.onnx + decode.onnx")


def run(args) -> int:
    import torch

    from taming_dist.checkpoint.export import export_run

    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    for folder in export_run(args.src, args.out, ema=not args.no_ema, dtype=dtype, fmt=args.format):
        print(f"wrote {folder}")
    return 0
