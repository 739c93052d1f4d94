"""FSQ, LFQ and LeCAM: known answers, straight-through gradients, the global batch, fp32 under
autocast, config and layout refusals, and a stage-2 run on the implicit codebooks' codes."""
import json
import math

import pytest
import torch

from taming_dist.config import QuantizerConfig, VQLossConfig, VQModelConfig, load_config
from taming_dist.config.schema import EncoderDecoderConfig
from taming_dist.losses.vqgan import VQGANLoss, lecam_penalty, update_lecam_ema
from taming_dist.models.collectives import ONE_PROCESS, Collectives
from taming_dist.models.quantize import FiniteScalarQuantizer, LookupFreeQuantizer, build_quantizer, entropy_groups
from taming_dist.models.vqgan import VQModel

LN2 = math.log(2.0)


def fsq(levels):
    n = math.prod(levels)
    return build_quantizer(QuantizerConfig(kind="fsq", levels=levels, n_embed=n, embed_dim=len(levels)), 4)


def lfq(bits, collectives=ONE_PROCESS, **kw):
    cfg = QuantizerConfig(kind="lfq", codebook_dim=bits, n_embed=2**bits, embed_dim=bits, **kw)
    return build_quantizer(cfg, 4, collectives)


# -- FSQ -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("level", [2, 3, 4, 5, 8])
def test_fsq_rounds_each_channel_to_its_levels(level):
    q = fsq([level])
    got = q.quantize(torch.linspace(-20, 20, 4001).unsqueeze(1)).unique().tolist()
    half = level // 2  # odd L: -(L-1)/2 .. (L-1)/2; even L: -L/2 .. L/2 - 1 (the half offset), / (L // 2)
    want = [(i - half) / half for i in range(level)]
    assert got == pytest.approx(want)
    b0 = q.bound(torch.zeros(1, 1))
    assert float(b0.abs()) < 0.05 and float(torch.round(b0)) == 0.0  # z = 0 lands on the middle level


def test_fsq_index_round_trip_on_every_code():
    q = fsq([8, 5, 5, 5])
    assert q.n_e == 1000 and q.e_dim == 4
    idx = torch.arange(1000)
    codes = q.indices_to_codes(idx)
    assert codes.unique(dim=0).shape == (1000, 4) and float(codes.abs().max()) == 1.0
    assert torch.equal(q.codes_to_indices(codes), idx)
    # an encoder output that the bound maps to within 0.4 of each code's level quantizes to that code
    levels, half_l = torch.tensor([8.0, 5, 5, 5]), (torch.tensor([8.0, 5, 5, 5]) - 1) * (1 - 1e-3) / 2
    offset = torch.tensor([0.5, 0, 0, 0])
    z = torch.atanh((0.9 * codes * (levels // 2) + offset) / half_l) - torch.tan(offset / half_l)
    z_q, loss, info = q(z.t().reshape(1, 4, 1, 1000))
    assert torch.equal(info["indices"].flatten(), idx) and float(loss) == 0.0
    assert torch.allclose(z_q.reshape(4, 1000).t(), codes, atol=1e-6)
    # digit-wise: index = sum(digit_i * cumprod([1, 8, 5, 5])_i), channel 0 least significant
    assert int(q.codes_to_indices(torch.tensor([[-1.0, -1.0, -1.0, -0.5]]))) == 1 * 200
    assert int(q(torch.zeros(1, 4, 1, 1))[2]["indices"]) == 4 + 2 * 8 + 2 * 40 + 2 * 200
    assert torch.equal(q.get_codebook_entry(idx.view(1, 10, 100)), codes.t().reshape(1, 4, 10, 100))
    assert torch.equal(q.codebook(), codes)


# -- LFQ -----------------------------------------------------------------------------------------

def test_lfq_signs_bits_and_codes():
    q = lfq(3)
    z = torch.tensor([[0.3, -0.2, 0.5], [-1.0, -2.0, -0.1]]).t().reshape(1, 3, 1, 2)
    z_q, _, info = q(z)
    assert info["indices"].flatten().tolist() == [1 + 4, 0]
    assert torch.equal(z_q.reshape(3, 2).t(), torch.tensor([[1.0, -1.0, 1.0], [-1.0, -1.0, -1.0]]))
    assert torch.equal(q.get_codebook_entry(torch.tensor([[[5]]])).flatten(), torch.tensor([1.0, -1.0, 1.0]))
    assert torch.equal(q.codebook()[6], torch.tensor([-1.0, 1.0, 1.0]))
    assert entropy_groups(18, 10) == [9, 9] and entropy_groups(7, 3) == [3, 2, 2] and entropy_groups(4, 10) == [4]


def test_lfq_entropies_known_answers():
    bits = 4
    for group_bits in (4, 2, 1):  # exact in groups for these: H_sample always, H_codebook on product marginals
        q = lfq(bits, entropy_temperature=1.0, entropy_group_bits=group_bits).eval()
        # uniform: z = 0 gives every code the same probability
        sample, book = q.entropies(torch.zeros(5, bits))
        assert float(sample) == pytest.approx(bits * LN2, rel=1e-6) and float(book) == pytest.approx(bits * LN2, rel=1e-6)
        # one-hot: large |z| makes each assignment certain; all vectors on one code -> no codebook entropy
        sample, book = q.entropies(torch.full((5, bits), 50.0))
        assert float(sample) < 1e-6 and float(book) < 1e-6
        # one-hot, each of the 16 codes once: the codebook is uniform
        sample, book = q.entropies(q.codebook() * 50.0)
        assert float(sample) < 1e-6 and float(book) == pytest.approx(bits * LN2, rel=1e-6)


def test_lfq_per_sample_entropy_in_groups_equals_the_whole_codebook_softmax():
    torch.manual_seed(0)
    z = torch.randn(7, 6)
    q = lfq(6, entropy_temperature=0.5, entropy_group_bits=2).eval()
    p = torch.softmax(2 * z @ q.codebook().t() / 0.5, dim=1)  # all 64 codes at once
    whole = -(p * p.log()).sum(1).mean()
    assert float(q.entropies(z)[0]) == pytest.approx(float(whole), rel=1e-5)


def test_lfq_codebook_entropy_is_the_global_batch_and_its_gradient_the_one_process_one():
    """Two ranks (halves of one batch, reduce = add the other half's sums) give the one-process
    codebook entropy, and the average of their gradients (what engines apply) its gradient."""
    torch.manual_seed(0)
    z = torch.randn(8, 4)
    one = lfq(4, entropy_temperature=0.5, entropy_group_bits=2).train()
    zr = z.clone().requires_grad_()
    ref = one.entropies(zr)[1]
    ref.backward()
    halves = [z[:4], z[4:]]
    local = []  # each rank's [sums | count], as its reduce receives them
    for h in halves:
        record = Collectives(reduce=lambda t: (local.append(t.clone()), t)[1])
        rec = lfq(4, entropy_temperature=0.5, entropy_group_bits=2, collectives=record).train()
        rec.entropies(h)
    grads = []
    for r, h in enumerate(halves):
        c = Collectives(reduce=lambda t, other=local[1 - r]: t + other, rank=r, world_size=2)
        q = lfq(4, entropy_temperature=0.5, entropy_group_bits=2, collectives=c).train()
        hr = h.clone().requires_grad_()
        book = q.entropies(hr)[1]
        assert float(book.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
        book.backward()
        grads.append(hr.grad)
    avg = torch.cat(grads) / 2  # data-parallel engines average gradients over ranks
    assert torch.allclose(avg, zr.grad, atol=1e-6)
    assert not torch.allclose(torch.cat(grads) / 4, zr.grad, atol=1e-6)  # without the scaling it would be off


def test_lfq_loss_terms_and_logs():
    q = lfq(2, beta=0.5, entropy_weight=0.2, diversity_gamma=2.0, entropy_temperature=1.0).eval()
    z = torch.tensor([[0.5, -0.5]]).reshape(1, 2, 1, 1)
    _, loss, info = q(z)
    commit = 0.25  # mean((z - sign z)^2)
    want = 0.5 * commit + 0.2 * (info["per_sample_entropy"] - 2.0 * info["codebook_entropy"])
    assert float(loss) == pytest.approx(float(want), rel=1e-6)
    assert float(info["per_sample_entropy"]) == pytest.approx(float(info["codebook_entropy"]), rel=1e-6)  # one vector


@pytest.mark.parametrize("kind", ["fsq", "lfq"])
def test_straight_through_gradients_reach_the_encoder(kind):
    torch.manual_seed(0)
    q = {"kind": "fsq", "levels": [5, 4, 3], "n_embed": 60, "embed_dim": 3} if kind == "fsq" else \
        {"kind": "lfq", "codebook_dim": 5, "n_embed": 32, "embed_dim": 5}
    dd = EncoderDecoderConfig(z_channels=8, resolution=8, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[])
    model = VQModel(VQModelConfig(ddconfig=dd, quantizer=QuantizerConfig(**q))).train()
    xrec, qloss, info = model(torch.rand(2, 3, 8, 8) * 2 - 1)
    (xrec.pow(2).mean() + qloss).backward()
    assert float(model.encoder.conv_in.weight.grad.norm()) > 0 and float(model.quant_conv.weight.grad.norm()) > 0
    assert info["indices"].shape == (2, 4, 4) and int(info["indices"].max()) < model.quantize.n_e
    assert 0 < float(info["usage"]) <= 1 and float(info["perplexity"]) >= 1
    assert list(model.quantize.state_dict()) == []  # an implicit codebook: no weights, no saved state
    images = model.eval().decode_code(info["indices"])
    assert images.shape == (2, 3, 8, 8)


@pytest.mark.parametrize("make", [lambda: fsq([8, 5, 5, 5]), lambda: lfq(4, entropy_temperature=0.1)])
def test_fp32_under_autocast(make):
    torch.manual_seed(0)
    q = make().train()
    z = (torch.randn(2, q.e_dim, 4, 4) * 0.7).bfloat16()
    ref_q, ref_loss, ref = q(z.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_q, got_loss, got = q(z)
    assert got_loss.dtype == torch.float32 and float(got_loss) == pytest.approx(float(ref_loss), rel=1e-6)
    assert torch.equal(got["indices"], ref["indices"]) and got_q.dtype == z.dtype
    assert torch.equal(got_q.float(), ref_q.bfloat16().float())


def test_config_checks_the_implicit_codebook():
    with pytest.raises(ValueError, match="quantizer.n_embed=1000 quantizer.embed_dim=4"):
        QuantizerConfig(kind="fsq", levels=[8, 5, 5, 5]).validate()
    with pytest.raises(ValueError, match="quantizer.n_embed=64 quantizer.embed_dim=6"):
        QuantizerConfig(kind="lfq", codebook_dim=6, n_embed=1024).validate()
    with pytest.raises(ValueError, match="levels"):
        QuantizerConfig(kind="fsq", levels=[1, 4], n_embed=4, embed_dim=2).validate()
    with pytest.raises(ValueError, match="only used by kind fsq"):
        QuantizerConfig(kind="vq", levels=[4]).validate()
    with pytest.raises(ValueError, match="kmeans_init"):
        build_quantizer(QuantizerConfig(kind="lfq", codebook_dim=3, n_embed=8, embed_dim=3, kmeans_init=True), 4)
    assert isinstance(fsq([3, 3]), FiniteScalarQuantizer) and isinstance(lfq(3), LookupFreeQuantizer)


# -- LeCAM ---------------------------------------------------------------------------------------

def test_lecam_penalty_on_fixed_logits():
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-2.0, 0.5])
    ema = torch.zeros(3)
    assert float(lecam_penalty(real, fake, ema)) == 0.0  # no EMA yet
    update_lecam_ema(ema, torch.tensor(1.0), torch.tensor(0.0), decay=0.9)  # debiased: exactly the first means
    # mean(relu([1, 3] - 0)^2) + mean(relu(1 - [-2, 0.5])^2) = 5 + 4.625
    assert float(lecam_penalty(real, fake, ema)) == pytest.approx(9.625)
    update_lecam_ema(ema, torch.tensor(3.0), torch.tensor(1.0), decay=0.9)
    w = 0.1 * 0.9 + 0.1  # 1 - 0.9^2
    assert float(ema[0] / ema[2]) == pytest.approx((0.09 * 1.0 + 0.1 * 3.0) / w)
    assert float(ema[1] / ema[2]) == pytest.approx(0.1 / w)
    loss = VQGANLoss(VQLossConfig(perceptual_weight=0.0, lecam_weight=0.5, disc_factor=2.0, disc_loss="hinge"))
    d, logs = loss.discriminator_loss(real.view(1, 1, 1, 2), fake.view(1, 1, 1, 2), 0, lecam_ema=ema)
    hinge = 0.5 * (torch.relu(1 - real).mean() + torch.relu(1 + fake).mean())
    assert float(d) == pytest.approx(2.0 * (float(hinge) + 0.5 * float(lecam_penalty(real, fake, ema))))
    assert "lecam" in logs
    with pytest.raises(ValueError, match="lecam_ema"):
        loss.discriminator_loss(real, fake, 0)


# -- layouts of the original, and the whole pipeline ---------------------------------------------

def test_original_layout_refuses_implicit_codebooks(tmp_path):
    from taming_dist.checkpoint.export import refuse_original_layout
    from taming_dist.checkpoint.taming_import import import_taming_checkpoint

    overrides = ["vqgan.quantizer.kind=fsq", "vqgan.quantizer.levels=[5,5,5]", "vqgan.quantizer.n_embed=125",
                 "vqgan.quantizer.embed_dim=3"]
    with pytest.raises(ValueError, match="original taming-transformers has no such quantizer"):
        refuse_original_layout(load_config("vqgan-tiny", overrides), "export --format taming")
    refuse_original_layout(load_config("vqgan-tiny"), "export --format taming")  # vq: fine
    preset = tmp_path / "lfq.yaml"
    preset.write_text("base: vqgan-tiny\nvqgan:\n  quantizer: {kind: lfq, codebook_dim: 4, n_embed: 16, embed_dim: 4}\n")
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(32, 3, 3, 3)}}, ckpt)
    with pytest.raises(ValueError, match="lfq.*no such quantizer"):
        import_taming_checkpoint(ckpt, preset=str(preset))


TINY = ["vqgan.ddconfig.ch=32", "vqgan.ddconfig.ch_mult=[1,2]", "vqgan.ddconfig.resolution=16",
        "vqgan.ddconfig.attn_resolutions=[8]", "vqgan.ddconfig.z_channels=8", "loss.discriminator.n_layers=1"]
KINDS = {"fsq": ["vqgan.quantizer.kind=fsq", "vqgan.quantizer.levels=[4,4,3]", "vqgan.quantizer.n_embed=48",
                 "vqgan.quantizer.embed_dim=3"],
         "lfq": ["vqgan.quantizer.kind=lfq", "vqgan.quantizer.codebook_dim=6", "vqgan.quantizer.n_embed=64",
                 "vqgan.quantizer.embed_dim=6", "vqgan.quantizer.entropy_group_bits=3"]}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fsq", "lfq"])
def test_pipeline_on_implicit_codebooks(tmp_path, kind):
    """train (LeCAM on, resumed mid-way) -> convert / export / from_pretrained -> eval-recon ->
    extract-codes -> a transformer over the implicit codebook trains and samples; --format taming refuses."""
    from safetensors.torch import load_file

    from taming_dist.cli import main
    from taming_dist.config import DataConfig
    from taming_dist.data.synthetic import ensure_synthetic
    from taming_dist.models import Transformer, VQModel as VQ, get_condition

    run = tmp_path / "vq"
    vq = ["vqgan-tiny", f"out_dir={tmp_path}", "name=vq", "logging.wandb_mode=disabled", "train.image_every=0",
          "data.synthetic_samples=64", "data.size=16", "train.global_batch_size=4", "train.ckpt_every=2",
          "loss.disc_start=0", "loss.lecam_weight=0.1", "loss.lecam_ema_decay=0.5", *TINY, *KINDS[kind]]
    assert main(["train", *vq, "train.steps=2"]) == 0
    assert main(["train", *vq, "train.steps=3"]) == 0  # resumes from step 2
    assert main(["convert", str(run), str(tmp_path / "vq.safetensors")]) == 0
    ema = load_file(tmp_path / "vq.safetensors")["discriminator.lecam_ema"]
    assert float(ema[2]) == pytest.approx(1 - 0.5**3)  # 3 updates: the EMA state came back on resume
    logs = [json.loads(line) for line in (run / "log.txt").read_text().splitlines() if line.startswith("{")]
    rows = [r for r in logs if "lecam" in r]
    assert rows and rows[-1]["lecam"] > 0, logs[-1]  # the penalty acts once the EMA exists
    if kind == "lfq":
        assert rows[-1]["codebook_entropy"] > 0 and "per_sample_entropy" in rows[-1]
    model = VQ.from_pretrained(run / "model")
    n_codes = {"fsq": 48, "lfq": 64}[kind]
    assert model.quantize.n_e == n_codes
    assert main(["export", str(run), str(tmp_path / "taming"), "--format", "taming"]) == 2
    assert main(["eval-recon", str(run / "model"), "synthetic", "--out", str(tmp_path / "recon.json"),
                 "--max-samples", "8", "--batch-size", "8", "--lpips-backbone", "random"]) == 0
    assert json.loads((tmp_path / "recon.json").read_text())
    small = ensure_synthetic(DataConfig(kind="synthetic", size=16, synthetic_samples=64))  # the run's own data
    assert main(["extract-codes", str(run / "model"), small, str(tmp_path / "codes"), "--size", "16"]) == 0
    # the built-in data at another image count (the demo's transformer trains on 16384); a shard folder
    # has its own count, so the option is refused there
    assert main(["extract-codes", str(run / "model"), "synthetic", str(tmp_path / "codes24"), "--size", "16",
                 "--synthetic-samples", "24"]) == 0
    assert json.loads((tmp_path / "codes24" / "manifest.json").read_text())["total"] == 24
    assert main(["extract-codes", str(run / "model"), small, str(tmp_path / "x"), "--synthetic-samples", "24"]) == 2
    fs = [o.replace("vqgan.", "transformer.first_stage.", 1) for o in TINY + KINDS[kind] if o.startswith("vqgan.")]
    assert main(["train", "transformer-tiny", f"out_dir={tmp_path}", "name=tr", "train.steps=2", "data.kind=codes",
                 f"data.path={tmp_path / 'codes'}", "data.size=16", "logging.wandb_mode=disabled",
                 "train.global_batch_size=4", "train.image_every=2", "transformer.gpt.n_layer=1",
                 f"transformer.gpt.vocab_size={n_codes}",  # the implicit codebook (class tokens share it)
                 f"first_stage_ckpt={run / 'model'}", *fs]) == 0
    assert (tmp_path / "tr" / "images" / "samples_000002.png").exists()
    t = Transformer.from_pretrained(tmp_path / "tr" / "model")
    codes = t.sample(get_condition(t, [0, 1]), generator=torch.Generator().manual_seed(0))
    assert codes.shape == (2, 64) and int(codes.max()) < n_codes
    assert t.decode_to_img(codes).shape == (2, 3, 16, 16)
