HELP = "write an image folder as webdataset shards with a manifest, or verify a shard folder (--verify)"
EXAMPLE = ("taming-dist shard /data/imagenet/train /data/shards/train --max-count 1000 --resize 288 --workers 8\n"
           "  taming-dist shard /data/photos /data/shards/captioned --captions captions.jsonl\n"
           "  taming-dist shard --verify /data/shards/train")


def add_arguments(parser) -> None:
    parser.add_argument("src", help="image folder (class sub-folders, or flat with --labels); with --verify, "
                                    "the shard folder to check")
    parser.add_argument("out", nargs="?", help="output folder for the shards (empty or new)")
    parser.add_argument("--verify", action="store_true", help="re-read SRC's shards, decode every image, report "
                                                              "problems; exit code 1 when any are found")
    parser.add_argument("--max-count", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--max-size", type=float, default=1e9, help="approximate bytes per shard (default 1e9)")
    parser.add_argument("--resize", type=int, default=None,
                        help="downscale so the shorter side is this many pixels (re-encodes); default keeps the bytes")
    parser.add_argument("--labels", default=None, help="labels for a flat folder: JSON {name: label} or lines "
                                                       "`name<TAB or space>label`")
    parser.add_argument("--captions", default=None,
                        help="captions: JSON Lines {\"path\": ..., \"caption\": ...} or CSV rows path,caption "
                             "(default: NAME.txt beside each image, when there is one); stored as each sample's txt")
    parser.add_argument("--workers", type=int, default=1, help="processes writing (or verifying) shards in parallel")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order (the sorted list is shuffled)")


def run(args) -> int:
    from taming_dist.data.shards import verify_shards, write_shards

    if args.verify:
        if args.out:
            raise ValueError("--verify takes one folder: taming-dist shard --verify FOLDER")
        report = verify_shards(args.src, workers=args.workers)
        print(report.summary())
        return 0 if report.ok else 1
    if not args.out:
        raise ValueError("missing OUT: taming-dist shard SRC OUT (or --verify FOLDER)")
    manifest = write_shards(args.src, args.out, max_count=args.max_count, max_size=int(args.max_size),
                            resize=args.resize, labels_file=args.labels, workers=args.workers, seed=args.seed,
                            captions_file=args.captions)
    print(f"wrote {len(manifest['shards'])} shards, {manifest['total']} samples, "
          f"{len(manifest['class_names'])} classes to {args.out}")
    if manifest.get("captions"):
        print(f"  captions: {manifest['captions']['present']} present, {manifest['captions']['missing']} missing")
    elif args.captions:
        raise ValueError(f"no image of {args.src} has a caption in {args.captions}: the paths there must be the "
                         "images' paths relative to SRC (or their file names)")
    for s in manifest["skipped"][:20]:
        print(f"  skipped unreadable {s['source']}: {s['reason']}")
    if len(manifest["skipped"]) > 20:
        print(f"  ... and {len(manifest['skipped']) - 20} more skipped")
    return 0
