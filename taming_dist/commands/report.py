HELP = ("write a run's report: one HTML file with its config, loss/metric curves, image grids, checkpoints and "
        "resume/requeue events, that opens from disk (no server, no network); works while the run is going")
EXAMPLE = ("taming-dist report runs/vqgan-f16 && xdg-open runs/vqgan-f16/report.html\n"
           "  taming-dist report runs/demo     # a folder of runs: one page, a section per run")


def add_arguments(parser) -> None:
    parser.add_argument("run", help="run folder (config.yaml, log.txt, ...), or a folder of run folders")
    parser.add_argument("--out", default=None, help="HTML file to write (default: RUN/report.html)")
    parser.add_argument("--max-thumbnails", type=int, default=48,
                        help="earlier image grids shown per kind (evenly spaced; the rest are linked)")


def run(args) -> int:
    from taming_dist.report import write_report

    if args.max_thumbnails < 0:
        raise ValueError(f"--max-thumbnails must be >= 0, got {args.max_thumbnails}")
    out = write_report(args.run, args.out, max_thumbnails=args.max_thumbnails)
    print(f"wrote {out}; open file://{out.resolve()} in a browser")
    return 0
