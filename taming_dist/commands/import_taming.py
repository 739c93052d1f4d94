HELP = ("import an original Taming-Transformers checkpoint (VQModel, GumbelVQ, Net2NetTransformer; "
        "Lightning .ckpt, no Lightning needed) into a model folder")
EXAMPLE = ("taming-dist import-taming vqgan_imagenet_f16_1024/ckpts/last.ckpt models/vqgan-f16-1024 "
           "--config vqgan_imagenet_f16_1024/configs/model.yaml --keep-loss")


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="the original .ckpt (or a bare state dict file)")
    parser.add_argument("out", help="output model folder (config.json + model.safetensors)")
    parser.add_argument("--kind", default="auto", choices=["auto", "vqgan", "gumbel", "net2net"])
    parser.add_argument("--config", default=None, help="the original YAML released beside the checkpoint")
    parser.add_argument("--preset", default=None, help="our preset to take hyper-parameters from, when no YAML")
    parser.add_argument("--keep-loss", action="store_true",
                        help="keep loss.* (discriminator, LPIPS) in loss.safetensors, for fine-tuning")


def run(args) -> int:
    from taming_dist.checkpoint.taming_import import import_taming_checkpoint, save_import

    result = import_taming_checkpoint(args.checkpoint, kind=args.kind, keep_loss=args.keep_loss,
                                      config=args.config, preset=args.preset)
    out = save_import(result, args.out)
    print(result.summary())
    print(f"wrote {out}")
    return 0
