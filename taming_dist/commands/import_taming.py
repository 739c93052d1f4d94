HELP = ("import an original Taming-Transformers checkpoint (VQModel, GumbelVQ, Net2NetTransformer; "
        "Lightning .ckpt, no Lightning needed) into a model folder")
EXAMPLE = ("taming-dist import-taming vqgan_imagenet_f16_1024/ckpts/last.ckpt models/vqgan-f16-1024 "
           "--config vqgan_imagenet_f16_1024/configs/model.yaml --keep-loss")


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="IN", help="the original .ckpt (or a bare state dict file)")
    parser.add_argument("out", metavar="OUT", help="output model folder (config.json + model.safetensors)")
    parser.add_argument("--kind", default="auto", choices=["auto", "vqgan", "gumbel", "net2net"],
                        help="model class of the checkpoint (default: detected from its keys)")
    parser.add_argument("--config", default=None,
                        help="the original YAML released beside the checkpoint (model: target, params); "
                             "needed when the checkpoint stores no hyper_parameters, as the released ones do not")
    parser.add_argument("--preset", default=None, help="take the architecture from one of our presets instead")
    parser.add_argument("--keep-loss", action="store_true",
                        help="keep loss.* (PatchGAN discriminator, LPIPS) in OUT/loss.safetensors, for fine-tuning")


def run(args) -> int:
    from taming_dist.checkpoint.taming_import import import_taming_checkpoint, save_import

    result = import_taming_checkpoint(args.checkpoint, kind=args.kind, keep_loss=args.keep_loss,
                                      config=args.config, preset=args.preset)
    out = save_import(result, args.out)
    print(result.summary())
    print(f"wrote {out}")
    return 0
