HELP = ("the main job: on the built-in captioned shapes, train a tiny VQGAN and then a tiny text-conditioned "
        "transformer on its codes, each on FSDP2 under torchrun (2 CPU ranks, or every GPU), sample from typed "
        "prompts (some never seen in training), and write overview.png, report.json and report.html")
EXAMPLE = "taming-dist demo --out runs/demo"

# What the demo adds to vqgan-tiny (README, "What `make demo` shows"): k-means initialisation of the
# codebook and restarts of codes whose usage EMA falls below 0.3 of an average code keep every code
# in use (76% of them without, on the data before issue 25). No GAN term (disc_start past the end):
# the target is PSNR, which the pixel term optimises, and the discriminator's step would cost time.
# The squared error as the pixel loss (loss.pixel_loss=l2): PSNR is its measure; one process, 600 steps,
# two data-order seeds: 20.25 and 19.33 dB against the L1 term's 18.04 and 17.93.
# Adam's betas (0.9, 0.99) in place of the preset's GAN pair (0.5, 0.9), at the preset's 1e-3: on the
# data v4 in one process, 600 steps, three data-order seeds gave 18.04, 17.93 and 18.18 dB held-out
# PSNR; at 2e-3 17.02, 14.08 and 18.69 (a path that any change of the numerics redraws); betas
# (0.5, 0.9) at 1e-3 17.38, one seed (README, "What `make demo` shows").
# Channels-last activations: the convolutions' preferred layout on CPU (0.146 s a step against 0.157
# on 2 FSDP2 ranks, tools/bench_train.py), the same model.
VQGAN_OVERRIDES = ["vqgan.quantizer.kmeans_init=true", "vqgan.quantizer.dead_code_threshold=0.3",
                   "loss.disc_start=1000000000", "train.optim.betas=[0.9,0.99]",
                   "engine.channels_last=true", "loss.pixel_loss=l2"]
# The tiny T5 the captions are encoded with (taming_dist/text/tiny.py): a word-level tokenizer over
# the built-in captions, random weights (still a distinct feature sequence per caption), 128 wide,
# at most 16 tokens (the longest caption, "yellow horizontal stripes on a purple background </s>",
# has 9). Wider random features are easier to read a caption's shape from: the demo's 2 x 256
# transformer, one process, 1200 steps on the same codes, samples of their prompt's shape (sampling
# seeds 0 / 1): 32 wide 49.4% / 45.6%, 64 wide 55.0% / 52.9%, 128 wide 53.1%; the features cost
# the same to extract (12 s for the 4096 captions). Its heads read the next and the previous word
# (build_tiny_encoder's neighbour_bias): without that a colour's feature did not say whether it
# was the shape's or the background's, and 34% of the samples of circles, squares, triangles, dots
# and crosses had their colours in the prompt's roles; with it 94% (the demo, 1200 steps).
TEXT_WIDTH, TEXT_TOKENS = 128, 16
# Samples: top-k 16, temperature 0.8, classifier-free guidance at scale 2.0 (transformer-text-tiny
# drops the caption with probability 0.1 for it). On the demo's weights (1600 steps), samples of their
# prompt's shape, sampling seeds 0 / 1: 67.1% / 65.4%, against 60.4% / 61.7% at the earlier top-k 16,
# temperature 1, scale 1.5; scale 2.5 65.4%, temperature 0.7 66.9%, top-k 8 67.7% (seed 0). Unseen
# prompts right, seeds 0 / 1: 61.5% / 53.1% against 44.8% / 52.1%. On data v5 and classifier v5 (README,
# "Sampling"): 84.4% / 82.9% of their shape; guidance 2.5 80.4% / 79.4%, 1.5 82.1% / 83.8%, temperature 0.7
# 85.4% / 83.5%, all within the seeds' spread or worse.
SAMPLING = {"top_k": 16, "temperature": 0.8, "cfg_scale": 2.0}
# transformer-text-tiny (4 layers, 128 wide) made 2 layers, 256 wide: one process, 1200 steps on the
# same codes, samples of their prompt's shape (top-k 32, scale 3): 4 x 128 31.2%, 8 x 128 32.1%,
# 4 x 256 40.6% (at 2.3x the step time), 2 x 256 40.4% (1.25x), 2 x 384 43.5% (2.2x), 1 x 384 34.6%.
TRANSFORMER_OVERRIDES = ["transformer.gpt.n_embd=256", "transformer.gpt.n_layer=2",
                         f"transformer.gpt.context_dim={TEXT_WIDTH}"]
# The steps, paid for by the fused AdamW on CPU (engines/base.py: build_optimizer; a VQGAN step 0.31 ->
# 0.22 s, a step of the 4 x 128 transformer 0.22 -> 0.15 s on 2 CPU ranks). vqgan-tiny's 600 raised to 800: its
# PSNR is still rising at 600 (at 2e-3, one run: 15.0 dB at 600 steps, 17.1 at 800).
# transformer-text-tiny's 400 raised to 1600: on the demo's codes, 1200 -> 1600 steps took the samples
# of their prompt's shape from 56.0% / 53.5% to 60.4% / 61.7% (top-k 16, scale 1.5, seeds 0 / 1) for
# 66 s (198 -> 264 s on 2 CPU ranks); a fresh-clone demo then trained and extracted in 361 s of the 480.
VQGAN_STEPS = 800
TRANSFORMER_STEPS = 1600
# The transformer trains on the codes of 16384 train-split images, the VQGAN on the first 4096 of them
# (the same draws: image i depends only on the seed and i). On 4096 the transformer memorised (12.5
# epochs; loss 1.10 nats a token on its images, 1.63 on held-out ones); on data v5, 1600 steps, sampling
# seeds 0 / 1 / 2: samples of their shape 90.6 / 89.8 / 89.8% against 84.4 / 82.9 / 84.0%, unseen prompts
# right 85.4 / 85.4 / 86.5% against 68.8 / 67.7 / 65.6%, for about 12 s more of extraction (README).
CODES_IMAGES = 16384
# On a GPU machine the same wall time trains this many times longer (issue 25; a guess: no GPU was
# lent to the session that wrote this, so neither the factor nor the wall time is measured).
GPU_STEP_FACTOR = 8


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="folder for both runs, the text encoder and the report")
    parser.add_argument("--vqgan-steps", type=int, default=None,
                        help=f"override the VQGAN's steps (default {VQGAN_STEPS})")
    parser.add_argument("--transformer-steps", type=int, default=None,
                        help=f"override the transformer's steps (default {TRANSFORMER_STEPS})")
    parser.add_argument("--codes-images", type=int, default=CODES_IMAGES,
                        help=f"train-split images whose codes the transformer trains on (default {CODES_IMAGES})")
    parser.add_argument("--per-prompt", type=int, default=16,
                        help="samples per prompt that are scored (the overview shows 4 of each)")
    parser.add_argument("--nproc", type=int, default=None,
                        help="ranks per stage (default: every GPU, or 2 CPU ranks on a machine without one)")
    parser.add_argument("overrides", nargs="*",
                        help="extra key=value overrides for both runs (e.g. logging.wandb_mode=disabled)")


def demo_prompts() -> tuple[list[str], list[str]]:
    """(seen, unseen) prompts: per class the first two held-out captions whose combination the train
    split draws, and the captions of every combination it never draws (synthetic.UNSEEN)."""
    from taming_dist.data.synthetic import (CLASS_NAMES, COLOUR_NAMES, SPLIT_SEEDS, UNSEEN, caption, captions,
                                            parse_caption)

    train = set(captions(4096, len(CLASS_NAMES), seed=SPLIT_SEEDS["train"]))
    held = [c for c in dict.fromkeys(captions(4096, len(CLASS_NAMES), seed=SPLIT_SEEDS["heldout"])) if c in train]
    seen = [c for label in range(len(CLASS_NAMES)) for c in [c for c in held if parse_caption(c)[0] == label][:2]]
    unseen = [caption(CLASS_NAMES.index(s), COLOUR_NAMES.index(f), COLOUR_NAMES.index(b)) for s, f, b in UNSEEN]
    return seen, unseen


def _launch(nproc: int, *argv: str) -> None:
    """One stage on `nproc` ranks under torchrun (a free rendezvous port on this machine)."""
    import os
    import subprocess
    import sys

    # torchrun would set one thread per rank and warn about it; the cores split evenly says the same
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, os.cpu_count() // nproc)))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "taming_dist", *argv]
    print("$ " + " ".join(["torchrun", "--standalone", f"--nproc_per_node={nproc}", "-m", "taming_dist", *argv]),
          flush=True)
    code = subprocess.call(cmd, env=env)
    if code != 0:
        raise RuntimeError(f"`taming-dist {argv[0]}` on {nproc} ranks failed with exit status {code} (its output is "
                           "above)")


def _trained(run_dir, steps: int) -> bool:
    """Whether `run_dir` already holds a finished run of `steps` steps: its `latest` checkpoint is that
    step and the model folder was written. A re-run of the demo then skips the stage instead of
    starting torchrun only to find nothing left to train (about 15 s of start-up per stage on 2 CPU
    ranks); anything else (no run, an unfinished one, other step counts) is launched and resumes."""
    latest = run_dir / "checkpoints" / "latest"
    return (latest.exists() and latest.read_text().strip() == f"step_{steps:06d}"
            and (run_dir / "model" / "model.safetensors").exists())


def run(args) -> int:
    import json
    import time
    from pathlib import Path

    import torch

    from taming_dist.data.synthetic import CLASS_NAMES, SPLIT_SEEDS, captions
    from taming_dist.report import write_report

    t0 = time.perf_counter()
    out = Path(args.out)
    gpu = torch.cuda.is_available()
    nproc = args.nproc or (torch.cuda.device_count() if gpu else 2)
    factor = GPU_STEP_FACTOR if gpu else 1
    # FSDP2 with the whole model as one group: the demo's ~1M-parameter models spend a step on
    # collective latency, not memory, and one group per model cut the VQGAN step on 2 CPU ranks
    # from 0.57 s to 0.36 s and the transformer's from 0.31 s to 0.25 s (README, "The demo")
    common = [f"out_dir={out}", "engine.kind=fsdp", "engine.fsdp_wrap=root", *args.overrides]
    vq_steps = args.vqgan_steps or VQGAN_STEPS * factor
    tr_steps = args.transformer_steps or TRANSFORMER_STEPS * factor
    device = f"{nproc} GPU ranks" if gpu else f"{nproc} CPU ranks"
    encoder_dir = out / "text-encoder"
    out.mkdir(parents=True, exist_ok=True)

    print(f"== 1/6 a tiny T5 text encoder for the built-in captions -> {encoder_dir}", flush=True)
    if not (encoder_dir / "config.json").exists():
        from taming_dist.text.tiny import build_tiny_encoder

        # every caption of both splits, so no prompt of the data's form has an unknown word
        vocab = [c for seed in SPLIT_SEEDS.values() for c in captions(4096, len(CLASS_NAMES), seed=seed)]
        build_tiny_encoder(str(encoder_dir), vocab, kind="t5", width=TEXT_WIDTH)

    from taming_dist.eval.demo_report import write_examples

    write_examples(out / "data.png")  # a held-out image of each class under its caption: what the demo learns
    print(f"== 2/6 training the VQGAN on FSDP2, {device} ({vq_steps} steps; vqgan-tiny with "
          f"{' '.join(VQGAN_OVERRIDES)}) -> {out / 'vqgan'}", flush=True)
    # Seconds per stage; a stage skipped as already done keeps the figure the report of its run recorded,
    # so a re-run does not report its own few seconds as the demo's training time.
    report_json = out / "report.json"
    recorded = json.loads(report_json.read_text()).get("timing", {}).get("stage_s", {}) if report_json.exists() else {}
    stage_s = {"setup": time.perf_counter() - t0}

    def stage(name: str, done: bool, skipped: str, *argv: str) -> None:
        """Launch `argv` on `nproc` ranks and time it, or say `skipped` and keep the recorded time."""
        if done:
            print(skipped, flush=True)
            stage_s[name] = recorded.get(name)
        else:
            t = time.perf_counter()
            _launch(nproc, *argv)
            stage_s[name] = time.perf_counter() - t

    vq_done = _trained(out / "vqgan", vq_steps)
    stage("vqgan", vq_done, f"already trained to step {vq_steps}: {out / 'vqgan'} (delete it to train again)",
          "train", "vqgan-tiny", *VQGAN_OVERRIDES, *common, "name=vqgan", f"train.steps={vq_steps}")

    codes = out / "codes"
    print(f"== 3/6 codes and caption features of {args.codes_images} train-split images -> {codes}", flush=True)
    # the codes of this very VQGAN, every shard done, of as many images as asked
    manifest = codes / "manifest.json"
    extracted = manifest.exists() and json.loads(manifest.read_text()).get("total") == args.codes_images
    if not (vq_done and extracted) and codes.exists():
        import shutil

        # codes of another VQGAN or image count: its finished-shard markers would be taken as done
        shutil.rmtree(codes)
    stage("codes", vq_done and extracted, f"already extracted: {codes}",
          "extract-codes", str(out / "vqgan"), "synthetic", str(codes), "--synthetic-samples", str(args.codes_images),
          "--text-encoder", str(encoder_dir), "--max-text-tokens", str(TEXT_TOKENS))

    print(f"== 4/6 training the text-conditioned transformer on FSDP2, {device} ({tr_steps} steps; "
          f"transformer-text-tiny with {' '.join(TRANSFORMER_OVERRIDES)}) -> {out / 'transformer'}", flush=True)
    # The encoder's folder is recorded with the model, so `taming-dist sample runs/demo/transformer/model
    # --prompt ...` finds it without --text-encoder.
    stage("transformer", vq_done and _trained(out / "transformer", tr_steps),
          f"already trained to step {tr_steps}: {out / 'transformer'} (delete it to train again)",
          "train", "transformer-text-tiny", *TRANSFORMER_OVERRIDES, *common, "name=transformer",
          f"train.steps={tr_steps}",
          f"data.path={codes}", f"first_stage_ckpt={out / 'vqgan' / 'model'}",
          f"transformer.condition.text_encoder={encoder_dir.resolve()}")
    # None (no wall-time row) when a skipped stage's time is unknown: its report is gone
    train_s = None if None in stage_s.values() else round(sum(stage_s.values()), 1)

    print(f"== 5/6 sampling {args.per_prompt} images per prompt (top_k {SAMPLING['top_k']}, temperature "
          f"{SAMPLING['temperature']}, cfg_scale {SAMPLING['cfg_scale']}) and quality on the held-out split",
          flush=True)
    from taming_dist.checkpoint.pretrained import build_model_from_folder
    from taming_dist.data.images import save_grid
    from taming_dist.eval.demo_report import demo_quality
    from taming_dist.models.pipeline import generate_image, get_condition
    from taming_dist.text import TextEncoder

    model = build_model_from_folder(out / "transformer" / "model").eval()
    encoder = TextEncoder.load(str(encoder_dir))
    seen, unseen = demo_prompts()
    gen = torch.Generator().manual_seed(0)
    prompts = seen + unseen
    texts = [p for p in prompts for _ in range(args.per_prompt)]
    with torch.no_grad():  # in batches of 240 samples: fewer decoding steps than one batch per prompt
        images = torch.cat([generate_image(model.first_stage_model, model,
                                           get_condition(model, texts[i:i + 240], text_encoder=encoder),
                                           generator=gen, **SAMPLING).float() for i in range(0, len(texts), 240)])
    samples = dict(zip(prompts, images.split(args.per_prompt)))
    save_grid(torch.cat(list(samples.values())), str(out / "samples.png"), nrow=args.per_prompt)
    print(f"wrote {out / 'samples.png'} (a row per prompt: {len(seen)} seen, then {len(unseen)} unseen combinations)")
    demo_quality(model.first_stage_model, samples, seen, unseen, out, sampling=SAMPLING,
                 timing={"train_and_extract_s": train_s,
                         "stage_s": {k: None if v is None else round(v, 1) for k, v in stage_s.items()}, "ranks": nproc,
                         "device": "cuda" if gpu else "cpu", "vqgan_steps": vq_steps, "transformer_steps": tr_steps})
    print(f"wrote {out / 'report.json'} and {out / 'overview.png'}")
    print("== 6/6 the report of both runs", flush=True)
    report = write_report(out)
    print(f"wrote {report}: open file://{report.resolve()} in a browser (no server needed)")
    print(f'try: taming-dist sample {out / "transformer" / "model"} --prompt "a yellow triangle on a purple '
          f'background" --out t2i.png  (demo done in {time.perf_counter() - t0:.0f} s)')
    return 0
