HELP = "import a diffusers VQModel folder (config.json + diffusion_pytorch_model.safetensors) as a model folder"
EXAMPLE = "taming-dist import-diffusers exported/vqgan-diffusers models/vqgan  # then init_from=models/vqgan"


def add_arguments(parser) -> None:
    parser.add_argument("src", help="a diffusers VQModel folder (from save_pretrained or export --format diffusers)")
    parser.add_argument("out", help="output model folder (config.json + model.safetensors)")


def run(args) -> int:
    from taming_dist.checkpoint.export import staged
    from taming_dist.interop.diffusers import load_diffusers
    from taming_dist.weights.folder import save_model_folder

    cfg, sd = load_diffusers(args.src)
    with staged(args.out) as tmp:
        save_model_folder(tmp, "vqgan", cfg, sd, extra_meta={"imported_from": "diffusers"})
    print(f"wrote {args.out}")
    return 0
