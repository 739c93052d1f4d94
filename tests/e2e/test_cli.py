"""End-to-end runs of the CLI on tiny configs: the demo pipeline, sample, reconstruct, help."""
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from tests.distributed.util import REPO, test_env

TINY_VQ = ["vqgan.ddconfig.ch=32", "vqgan.ddconfig.ch_mult=[1,2]", "vqgan.ddconfig.resolution=16", "data.size=16",
           "vqgan.ddconfig.attn_resolutions=[8]", "loss.discriminator.n_layers=1"]


def cli(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "taming_dist", *args], cwd=REPO, env=test_env(), capture_output=True,
                       text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"taming-dist {' '.join(args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def test_every_subcommand_has_help_with_an_example():
    from taming_dist.cli import COMMANDS

    for name in COMMANDS:
        out = cli(name, "--help").stdout
        assert "example:" in out and "taming-dist" in out, name


def test_config_errors_are_one_clear_line():
    p = cli("train", "vqgan-tiny", "train.stepz=3", check=False)
    assert p.returncode == 2
    assert "unknown config key `train.stepz`" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_demo_pipeline_sample_and_reconstruct(tmp_path):
    from taming_dist.commands.demo import demo_prompts

    out = tmp_path / "demo"
    p = cli("demo", "--out", str(out), "--vqgan-steps", "12", "--transformer-steps", "12", "--per-prompt", "2",
            "--codes-images", "480", "logging.wandb_mode=offline", "train.image_every=6", "train.ckpt_every=6",
            "logging.progress=false")
    seen, unseen = demo_prompts()
    assert len(seen) == 24 and len(unseen) == 6 and not set(seen) & set(unseen)
    # the demo ends with its quality against the targets: table, report.json, overview.png, report.html
    assert ("quality on the held-out split (512 images; 60 samples of 30 prompts, 6 of them unseen combinations)"
            in p.stdout) and "reconstruction PSNR" in p.stdout and "unseen prompts: shape + colours" in p.stdout
    report = json.loads((out / "report.json").read_text())
    rec, samples = report["heldout_reconstruction"], report["samples"]
    assert rec["images"] == 512 and 0 < rec["psnr"] < 60 and 0 < rec["usage"] <= 1 and samples["count"] == 60
    assert set(samples["unseen_prompts"]["per_prompt"]) == set(unseen)
    assert "a yellow triangle on a purple background" in unseen
    assert 0 <= samples["shape_accuracy"] <= 1 and 0 <= samples["unseen_prompts"]["prompt_accuracy"] <= 1
    assert samples["fd"] > samples["fd_real"] >= 0  # 12 steps: far from real images
    assert 0 <= rec["class_accuracy"] <= 1 and rec["class_accuracy_images"] == 240
    assert report["targets"]["psnr"] == 26.0 and report["timing"]["ranks"] == 2
    # the demo's own settings are on: guided sampling, k-means init of the codebook (its done flag),
    # the squared-error pixel loss (its logged mse is the training term) and the 2 x 256 transformer
    assert samples["sampling"] == {"top_k": 16, "temperature": 0.8, "cfg_scale": 2.0} and "cfg_scale 2.0" in p.stdout
    assert "kmeans_init=true" in p.stdout and "dead_code_threshold=0.3" in p.stdout
    import yaml
    vq_cfg = yaml.safe_load((out / "vqgan" / "config.yaml").read_text())
    quantizer = vq_cfg["vqgan"]["quantizer"]
    assert quantizer["kmeans_init"] is True and quantizer["dead_code_threshold"] == 0.3
    assert vq_cfg["loss"]["pixel_loss"] == "l2"
    vq_rows = [json.loads(line) for line in (out / "vqgan" / "log.txt").read_text().splitlines()
               if line.startswith('{"step"')]
    assert vq_rows[-1]["nll"] == pytest.approx(vq_rows[-1]["mse"], rel=1e-5) != vq_rows[-1]["l1"]
    gpt = yaml.safe_load((out / "transformer" / "config.yaml").read_text())["transformer"]["gpt"]
    assert (gpt["n_layer"], gpt["n_embd"], gpt["context_dim"]) == (2, 256, 128)
    assert json.loads((out / "text-encoder" / "config.json").read_text())["d_model"] == 128
    from safetensors.torch import load_file  # its heads read the next (bucket 17) and previous (1) word

    bias = load_file(out / "text-encoder" / "model.safetensors")[
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    assert bias[17, 0] > 5 and bias[1, 1] > 5
    with Image.open(out / "overview.png") as overview:
        height = overview.size[1]
    assert height >= 2 * 2 * 32 + 10 * 2 * 32  # originals, reconstructions, 10 rows of 3 prompts, 2x
    assert 'id="run-vqgan"' in (out / "report.html").read_text()
    with Image.open(out / "samples.png") as grid:
        size = grid.size
    assert size[0] >= 2 * 32 and size[1] > 30 * 32  # 30 prompts x 2 samples of 32 px
    assert (out / "text-encoder" / "tokenizer.json").exists()
    # the transformer trained on the codes of as many train-split images as asked (the VQGAN on 4096)
    assert json.loads((out / "codes" / "manifest.json").read_text())["total"] == 480
    assert "--synthetic-samples 480" in p.stdout
    for stage, image in (("vqgan", "recon_000012.png"), ("transformer", "samples_000012.png")):
        run_dir = out / stage
        assert (run_dir / "images" / image).exists()
        assert (run_dir / "config.yaml").exists() and (run_dir / "model" / "model.safetensors").exists()
        engine = yaml.safe_load((run_dir / "config.yaml").read_text())["engine"]
        assert engine["kind"] == "fsdp" and engine["fsdp_wrap"] == "root"  # one FSDP2 group per model
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000012"
        assert list((run_dir / "wandb").glob("offline-run-*")), "wandb offline data missing"
        lines = (run_dir / "log.txt").read_text().splitlines()
        rows = [json.loads(line) for line in lines if line.startswith('{"step"')]
        assert rows[-1]["step"] == 12 and all(r["skipped_total"] == 0 for r in rows)
        # accounting in every logged row: per-device and total rates, step time, data wait, ETA
        unit = "images" if stage == "vqgan" else "tokens"
        last = rows[-1]
        assert last[f"{unit}_per_s"] > 0
        assert last[f"{unit}_per_s_per_device"] == pytest.approx(last[f"{unit}_per_s"] / 2)  # FSDP2 on 2 ranks
        assert last["step_s"] > 0 and 0 <= last["data_wait_frac"] < 1 and last["eta_s"] == 0
        assert "mfu" not in last  # no peak FLOP/s for a CPU
    # re-running finds both runs finished: no stage is launched again, same weights, a new report
    # and its report keeps the training time of the run that trained (not the re-run's seconds)
    before = (out / "vqgan" / "model" / "model.safetensors").read_bytes()
    first = report["timing"]["stage_s"]
    assert set(first) == {"setup", "vqgan", "codes", "transformer"} and first["vqgan"] > 5
    p = cli("demo", "--out", str(out), "--vqgan-steps", "12", "--transformer-steps", "12", "--per-prompt", "2",
            "--codes-images", "480", "logging.wandb_mode=disabled")
    assert "$ torchrun" not in p.stdout and p.stdout.count("already trained to step 12") == 2, p.stdout
    assert "already extracted" in p.stdout
    again = json.loads((out / "report.json").read_text())["timing"]
    assert {k: again["stage_s"][k] for k in ("vqgan", "codes", "transformer")} == {
        k: first[k] for k in ("vqgan", "codes", "transformer")}
    # the report rounds to 0.1 s, and 11.3 + 12.8 + 9.8 is 33.900000000000006 in floating point
    assert again["train_and_extract_s"] >= round(first["vqgan"] + first["codes"] + first["transformer"], 1)
    assert (out / "vqgan" / "model" / "model.safetensors").read_bytes() == before
    # the README's command: the text encoder is found from the model folder, no --text-encoder
    p = cli("sample", str(out / "transformer" / "model"), "--prompt", "a yellow triangle on a purple background",
            "--per-class", "3", "--out", str(tmp_path / "s.png"))
    with Image.open(tmp_path / "s.png") as drawn:
        assert "wrote 3 samples" in p.stdout and drawn.size[0] > 2 * 32
    p = cli("reconstruct", str(out / "vqgan"), "--count", "4", "--out", str(tmp_path / "r.png"))
    assert "PSNR" in p.stdout and (tmp_path / "r.png").exists()


@pytest.mark.slow
@pytest.mark.one_process  # one process at a time: runs in the parallel batch (tests/conftest.py)
def test_transformer_trains_from_extracted_codes(tmp_path):
    vq = ["vqgan-tiny", f"out_dir={tmp_path}", "name=vq", "train.steps=2", "logging.wandb_mode=disabled",
          "train.image_every=0", "data.synthetic_samples=256", *TINY_VQ]
    cli("train", *vq)
    cli("extract-codes", str(tmp_path / "vq"), "synthetic", str(tmp_path / "codes"), "--size", "16")
    fs = [o.replace("vqgan.", "transformer.first_stage.", 1) for o in TINY_VQ if o.startswith("vqgan.")]
    cli("train", "transformer-tiny", f"out_dir={tmp_path}", "name=tr", "train.steps=3", "data.kind=codes",
        f"data.path={tmp_path / 'codes'}", "data.size=16", "logging.wandb_mode=disabled", "train.image_every=3",
        f"first_stage_ckpt={tmp_path / 'vq'}", *fs)
    assert (tmp_path / "tr" / "images" / "samples_000003.png").exists()
    from taming_dist.checkpoint.pretrained import build_model_from_folder

    model = build_model_from_folder(tmp_path / "tr" / "model")
    assert model.config.first_stage.ddconfig.resolution == 16
    assert (tmp_path / "codes" / "manifest.json").exists()
    # a pipeline export: vqgan/ + transformer/, each loadable with no training code
    cli("export", str(tmp_path / "tr"), str(tmp_path / "pipe"))
    from taming_dist.models import Transformer, VQModel

    t, v = Transformer.from_pretrained(tmp_path / "pipe"), VQModel.from_pretrained(tmp_path / "pipe")
    for k, w in v.state_dict().items():
        assert torch.equal(w, t.first_stage_model.state_dict()[k]), k
    for k, w in model.transformer.state_dict().items():
        assert torch.equal(w, t.transformer.state_dict()[k]), k


@pytest.mark.slow
@pytest.mark.one_process
def test_non_finite_steps_are_skipped_counted_then_halt(tmp_path):
    # An absurd learning rate turns the weights non-finite after the first update; every later
    # step is skipped and counted, and the run stops with a clear message after max_bad_steps.
    p = cli("train", "vqgan-tiny", f"out_dir={tmp_path}", "name=nan", "train.steps=20", "train.optim.lr=1e30",
            "train.max_bad_steps=3", "train.log_every=1", "train.image_every=0", "logging.wandb_mode=disabled",
            "data.synthetic_samples=256", *TINY_VQ, "train.global_batch_size=4", "train.micro_batch_size=4",
            check=False)
    assert p.returncode != 0
    assert "3 non-finite steps in a row" in p.stderr and "grad_clip" in p.stderr
    assert p.stdout.count("step skipped") == 3
