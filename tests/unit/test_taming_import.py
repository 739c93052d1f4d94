"""Import of checkpoints in the ORIGINAL format, built here: Lightning-style dicts whose state_dict
uses the original key names (`loss.perceptual_loss.*`, `loss.discriminator.*`,
`transformer.blocks.i.attn.mask`), from tiny configs given as original-style YAML."""
import sys
import types

import pytest
import torch
import yaml

from taming_dist.checkpoint.pretrained import build_model_from_folder
from taming_dist.weights.safe_load import safe_load
from taming_dist.checkpoint.taming_import import import_taming_checkpoint, save_import
from taming_dist.cli import main
from taming_dist.config import (
    ConditionConfig,
    DiscriminatorConfig,
    EncoderDecoderConfig,
    GPTConfig,
    QuantizerConfig,
    TransformerModelConfig,
    VQModelConfig,
)
from taming_dist.losses.lpips import lpips_keys
from taming_dist.models.discriminator import NLayerDiscriminator
from taming_dist.models.transformer import Transformer
from taming_dist.models.vqgan import VQModel

# A tiny original ddconfig (16 px, f2), including the original options our nets fix.
DD = {"double_z": False, "z_channels": 32, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
      "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0, "resamp_with_conv": True}
LOSS = {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
        "params": {"disc_conditional": False, "disc_in_channels": 3, "disc_start": 7, "disc_weight": 0.8,
                   "codebook_weight": 1.0, "disc_num_layers": 2, "disc_ndf": 16}}
VQ_TARGET = "taming.models.vqgan.VQModel"
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vq_params(n_embed=64, embed_dim=16, in_channels=3, **extra):
    return {"embed_dim": embed_dim, "n_embed": n_embed, "ddconfig": {**DD, "in_channels": in_channels}, **extra}


def our_vq(n_embed=64, embed_dim=16, in_channels=3, kind="vq") -> VQModelConfig:
    dd = {k: v for k, v in DD.items() if k != "resamp_with_conv"}
    return VQModelConfig(ddconfig=EncoderDecoderConfig(**{**dd, "in_channels": in_channels}),
                         quantizer=QuantizerConfig(kind=kind, n_embed=n_embed, embed_dim=embed_dim))


def write_yaml(path, target, params):
    path.write_text(yaml.safe_dump({"model": {"base_learning_rate": 4.5e-6, "target": target, "params": params}}))
    return str(path)


def lightning(state_dict, monkeypatch=None, **extra):
    """A PL 1.0-style checkpoint dict; with monkeypatch, its callbacks are keyed by a class pickled
    under Lightning's name (as the released files are), which safe_load must read without Lightning."""
    callbacks = {}
    if monkeypatch is not None:
        for m in ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"):
            monkeypatch.setitem(sys.modules, m, types.ModuleType(m))
        cls = type("ModelCheckpoint", (), {"__module__": "pytorch_lightning.callbacks.model_checkpoint"})
        sys.modules["pytorch_lightning.callbacks.model_checkpoint"].ModelCheckpoint = cls
        callbacks = {cls: {"best_model_score": torch.tensor(0.1), "best_model_path": "logs/last.ckpt"}}
    return {"epoch": 4, "global_step": 1000, "pytorch-lightning_version": "1.0.8", "state_dict": state_dict,
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-6, "params": [0, 1]}]}] * 2,
            "lr_schedulers": [], "callbacks": callbacks, **extra}


def fake_lpips_state(seed=0) -> dict:
    """Random tensors with the original LPIPS keys and shapes (VGG16 backbone + lin layers)."""
    g = torch.Generator().manual_seed(seed)
    shapes, cin = [], 3
    for v in VGG16_CFG:
        if v != "M":
            shapes += [(v, cin, 3, 3), (v,)]
            cin = v
    widths = [64, 128, 256, 512, 512]
    shapes = [(1, 3, 1, 1), (1, 3, 1, 1), *shapes, *((1, c, 1, 1) for c in widths)]
    return {k: torch.rand(s, generator=g) * 0.1 for k, s in zip(lpips_keys(), shapes)}


@pytest.fixture
def vq_original(tmp_path, monkeypatch):
    """(ckpt path, yaml path, the model the weights came from, its discriminator, LPIPS weights)."""
    torch.manual_seed(0)
    model = VQModel(our_vq()).eval()
    disc = NLayerDiscriminator(DiscriminatorConfig(n_layers=2, ndf=16))
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a mix-up would show
        for name, buf in disc.named_buffers():
            if "running" in name:
                buf.uniform_(0.5, 1.5)
    lp = fake_lpips_state()
    sd = dict(model.state_dict())
    sd.update({f"loss.discriminator.{k}": v for k, v in disc.state_dict().items()})
    sd.update({f"loss.perceptual_loss.{k}": v for k, v in lp.items()})
    torch.save(lightning(sd, monkeypatch), tmp_path / "last.ckpt")
    monkeypatch.delitem(sys.modules, "pytorch_lightning")
    cfg = write_yaml(tmp_path / "model.yaml", VQ_TARGET, vq_params(lossconfig=LOSS))
    return tmp_path / "last.ckpt", cfg, model, disc, lp


def test_vqmodel_import_reproduces_the_original_and_keeps_the_loss(tmp_path, vq_original):
    path, cfg, model, disc, lp = vq_original
    result = import_taming_checkpoint(path, config=cfg, keep_loss=True)
    r = result.report
    assert (result.model_type, r["kind"], r["unexpected"], r["dropped"]) == ("vqgan", "vqgan", [], {})
    assert r["loaded"] == len(model.state_dict()) and r["hparams_source"] == cfg
    assert result.cfg == our_vq() and result.loss_cfg.disc_start == 7 and result.loss_cfg.disc_weight == 0.8
    out = save_import(result, tmp_path / "imported")
    imported = build_model_from_folder(out).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        (rec_a, _, info_a), (rec_b, _, info_b) = imported(x), model(x)
    torch.testing.assert_close(rec_a, rec_b, rtol=0, atol=0)
    assert torch.equal(info_a["indices"], info_b["indices"])
    # the PatchGAN: exactly the original weights and BatchNorm statistics, strictly
    loss_sd = safe_load(out / "loss.safetensors")
    d2 = NLayerDiscriminator(DiscriminatorConfig(n_layers=2, ndf=16))
    d2.load_state_dict({k[len("discriminator."):]: v for k, v in loss_sd.items() if k.startswith("discriminator.")})
    for (k, a), b in zip(disc.state_dict().items(), d2.state_dict().values()):
        assert torch.equal(a, b), k
    # LPIPS: the original keys plus the lpips package's `lins.<i>` aliases of `lin<i>`
    perceptual = {k[len("perceptual_loss."):]: v for k, v in loss_sd.items() if k.startswith("perceptual_loss.")}
    assert set(perceptual) == set(lpips_keys()) | {f"lins.{i}.model.1.weight" for i in range(5)}
    assert torch.equal(perceptual["lins.3.model.1.weight"], lp["lin3.model.1.weight"])
    assert torch.equal(perceptual["net.slice4.19.weight"], lp["net.slice4.19.weight"])


@pytest.mark.slow
def test_kept_lpips_weights_serve_as_the_offline_backbone(tmp_path, vq_original):
    """loss.safetensors (or the original checkpoint itself) is a valid loss.lpips_vgg_path."""
    from taming_dist.config import VQLossConfig
    from taming_dist.losses.lpips import build_lpips

    path, cfg, _, _, lp = vq_original
    out = save_import(import_taming_checkpoint(path, config=cfg, keep_loss=True), tmp_path / "m")
    for source in (out / "loss.safetensors", path):
        lpips = build_lpips(VQLossConfig(lpips_vgg_path=str(source)))
        for k in ("net.slice1.0.weight", "net.slice5.28.bias", "lin2.model.1.weight"):
            assert torch.equal(lpips.state_dict()[k], lp[k]), (source, k)


def test_loss_weights_are_dropped_and_reported_by_default(vq_original):
    result = import_taming_checkpoint(vq_original[0], config=vq_original[1])
    assert not result.loss_state_dict and result.loss_cfg is None
    (reason, keys), = result.report["dropped"].items()
    assert "keep_loss" in reason and "loss.discriminator.main.0.weight" in keys
    n = 33 + len(vq_original[3].state_dict())  # LPIPS + PatchGAN
    assert "loss.perceptual_loss.lin0.model.1.weight" in keys and len(keys) == n
    assert f"dropped {n} loss weights" in result.summary()


def test_missing_keys_and_wrong_shapes_are_named(tmp_path, vq_original):
    path, cfg = vq_original[:2]
    ck = safe_load(path)
    del ck["state_dict"]["decoder.conv_out.weight"]
    torch.save(ck, tmp_path / "broken.ckpt")
    with pytest.raises(ValueError, match=r"missing 1 key\(s\) \['decoder.conv_out.weight'\]"):
        import_taming_checkpoint(tmp_path / "broken.ckpt", config=cfg)
    small = write_yaml(tmp_path / "small.yaml", VQ_TARGET, vq_params(n_embed=32))
    with pytest.raises(ValueError, match=r"quantize.embedding.weight \(64, 16\) != \(32, 16\)"):
        import_taming_checkpoint(path, config=small)
    with pytest.raises(ValueError, match="carries no hyper-parameters: pass --config"):
        import_taming_checkpoint(path)


def test_unexpected_keys_are_reported_not_loaded(tmp_path, vq_original):
    ck = safe_load(vq_original[0])
    ck["state_dict"]["model_ema.decay"] = torch.tensor(0.99)
    torch.save(ck, tmp_path / "extra.ckpt")
    result = import_taming_checkpoint(tmp_path / "extra.ckpt", config=vq_original[1])
    assert result.report["unexpected"] == ["model_ema.decay"] and "model_ema.decay" not in result.model_state_dict
    assert "unexpected, not loaded (1): model_ema.decay" in result.summary()


def test_original_options_without_an_equivalent_are_refused(tmp_path, vq_original):
    path = vq_original[0]
    for params, msg in [(vq_params(use_ema=True), r"unsupported original parameter\(s\) \['use_ema'\]"),
                        (vq_params(remap="data/used_codes.npy"), "remap"),
                        ({**vq_params(), "ddconfig": {**DD, "resamp_with_conv": False}}, "resamp_with_conv")]:
        with pytest.raises(ValueError, match=msg):
            import_taming_checkpoint(path, config=write_yaml(tmp_path / "x.yaml", VQ_TARGET, params))
    bad_disc = {**LOSS, "params": {**LOSS["params"], "disc_num_layers": 3}}
    with pytest.raises(ValueError, match=r"loss.discriminator: missing .*disc_num_layers"):
        import_taming_checkpoint(path, keep_loss=True,
                                 config=write_yaml(tmp_path / "d.yaml", VQ_TARGET, vq_params(lossconfig=bad_disc)))


def test_gumbel_import_with_hyper_parameters_from_the_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = VQModel(our_vq(embed_dim=32, kind="gumbel")).eval()
    assert "quantize.proj.weight" in model.state_dict()
    AttributeDict = type("AttributeDict", (dict,), {"__module__": "pytorch_lightning.utilities.parsing"})
    for m in ("pytorch_lightning", "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing"):
        monkeypatch.setitem(sys.modules, m, types.ModuleType(m))
    sys.modules["pytorch_lightning.utilities.parsing"].AttributeDict = AttributeDict
    schedule = {"target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler"}
    hp = AttributeDict(vq_params(embed_dim=32, kl_weight=1e-8, lossconfig=LOSS, temperature_scheduler_config=schedule))
    torch.save(lightning(dict(model.state_dict()), hyper_parameters=hp), tmp_path / "g.ckpt")
    monkeypatch.delitem(sys.modules, "pytorch_lightning")
    result = import_taming_checkpoint(tmp_path / "g.ckpt")
    assert result.report["kind"] == "gumbel" and result.report["hparams_source"] == "the checkpoint's hyper_parameters"
    assert result.cfg.quantizer.kind == "gumbel" and result.cfg.quantizer.kl_weight == 1e-8
    with pytest.raises(ValueError, match="holds no loss.discriminator.* / loss.perceptual_loss.* weights to keep"):
        import_taming_checkpoint(tmp_path / "g.ckpt", keep_loss=True)
    imported = build_model_from_folder(save_import(result, tmp_path / "g")).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.manual_seed(1)
        a = imported(x)[0]
        torch.manual_seed(1)
        b = model(x)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _gpt(**kw):
    return {"vocab_size": 64, "block_size": 128, "n_layer": 2, "n_head": 2, "n_embd": 32, **kw}


def _net2net_yaml(tmp_path, cond_stage_config, gpt=None, **extra):
    return write_yaml(tmp_path / "n2n.yaml", "taming.models.cond_transformer.Net2NetTransformer", {
        "transformer_config": {"target": "taming.modules.transformer.mingpt.GPT", "params": gpt or _gpt()},
        "first_stage_config": {"target": VQ_TARGET,
                               "params": vq_params(lossconfig={"target": "taming.modules.losses.DummyLoss"})},
        "cond_stage_config": cond_stage_config, "first_stage_key": "image", "cond_stage_key": "depth", **extra})


def test_net2net_with_a_depth_tokens_stage_through_the_cli(tmp_path, capsys):
    torch.manual_seed(0)
    tcfg = TransformerModelConfig(gpt=GPTConfig(**_gpt()), first_stage=our_vq(),
                                  condition=ConditionConfig(kind="tokens", cond_vqgan=our_vq(in_channels=1)))
    model = Transformer(tcfg).eval()
    sd = dict(model.state_dict())
    for i in range(2):  # minGPT stores its causal mask as a buffer
        sd[f"transformer.blocks.{i}.attn.mask"] = torch.tril(torch.ones(128, 128)).view(1, 1, 128, 128)
    torch.save(lightning(sd), tmp_path / "n2n.ckpt")
    cfg = _net2net_yaml(tmp_path, {"target": VQ_TARGET, "params": vq_params(in_channels=1)},
                        downsample_cond_size=256)
    argv = ["import-taming", str(tmp_path / "n2n.ckpt"), str(tmp_path / "n2n"), "--config", cfg]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "net2net -> transformer" in printed and "dropped 2 GPT attn.mask buffers" in printed
    assert "downsample_cond_size" in printed and f"wrote {tmp_path / 'n2n'}" in printed
    imported = build_model_from_folder(tmp_path / "n2n").eval()
    assert imported.config.condition.kind == "tokens" and imported.config.condition.cond_vqgan == our_vq(in_channels=1)
    idx = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(imported(idx), model(idx), rtol=0, atol=0)
        depth = torch.rand(1, 1, 16, 16) * 2 - 1
        assert torch.equal(imported.encode_to_c({"cond_image": depth}), model.encode_to_c({"cond_image": depth}))
    # an error is one line on stderr and exit status 2
    del sd["transformer.head.weight"]
    torch.save(lightning(sd), tmp_path / "broken.ckpt")
    assert main(["import-taming", str(tmp_path / "broken.ckpt"), str(tmp_path / "b"), "--config", cfg]) == 2
    assert "transformer.head.weight" in capsys.readouterr().err and not (tmp_path / "b").exists()


@pytest.mark.parametrize("cond_stage,extra,expected", [
    ({"target": "taming.modules.util.SOSProvider", "params": {"sos_token": 3}}, {}, ("none", 3, 0)),
    ("__is_unconditional__", {"sos_token": 5}, ("none", 5, 0)),
    ({"target": VQ_TARGET, "params": vq_params()}, {"unconditional": True}, ("none", 0, 0)),
    ({"target": "taming.modules.util.Labelator", "params": {"n_classes": 10}}, {}, ("class", 0, 10)),
    ({"target": "taming.modules.util.Labelator"}, {}, ("class", 0, 1000)),
])
def test_net2net_conditioning_kinds(tmp_path, cond_stage, extra, expected):
    vocab = 1024 if expected[2] == 1000 else 64
    tcfg = TransformerModelConfig(gpt=GPTConfig(**_gpt(vocab_size=vocab)), first_stage=our_vq(),
                                  condition=ConditionConfig(kind=expected[0], sos_token=expected[1],
                                                            n_classes=expected[2]))
    torch.save(lightning(dict(Transformer(tcfg).state_dict())), tmp_path / "n.ckpt")
    result = import_taming_checkpoint(tmp_path / "n.ckpt",
                                      config=_net2net_yaml(tmp_path, cond_stage, _gpt(vocab_size=vocab), **extra))
    cond = result.cfg.condition
    assert (cond.kind, cond.sos_token, cond.n_classes) == expected and result.cfg == tcfg


def test_net2net_with_a_reordering_permuter_is_refused(tmp_path):
    tcfg = TransformerModelConfig(gpt=GPTConfig(**_gpt()), first_stage=our_vq())
    torch.save(lightning(dict(Transformer(tcfg).state_dict())), tmp_path / "n.ckpt")
    cfg = _net2net_yaml(tmp_path, "__is_unconditional__",
                        permuter_config={"target": "taming.modules.transformer.permuter.AlternateParsing"})
    with pytest.raises(ValueError, match="AlternateParsing.*only the Identity permuter"):
        import_taming_checkpoint(tmp_path / "n.ckpt", config=cfg)


def test_model_folder_format(tmp_path):
    """config.json + model.safetensors: shared and non-contiguous tensors saved, an existing folder
    replaced whole, no temporary left, bad folders named."""
    import dataclasses
    import json

    from taming_dist.weights.folder import load_model_folder, save_model_folder

    cfg = our_vq()
    sd = dict(VQModel(cfg).state_dict())
    shared = torch.randn(32, 2)
    sd["encoder.conv_in.bias"], sd["post_quant_conv.bias"] = shared[:, 0], shared[:, 0]  # one storage, strided
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "stale.txt").write_text("from an older export")
    out = save_model_folder(tmp_path / "m", "vqgan", cfg, sd, extra_meta={"step": 7},
                            extra_tensors={"loss.safetensors": {"a": shared, "b": shared}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "loss.safetensors", "model.safetensors"]
    meta = json.loads((out / "config.json").read_text())
    assert meta == {"format": "taming_dist", "model_type": "vqgan", "config": dataclasses.asdict(cfg), "step": 7}
    model_type, cfg2, sd2 = load_model_folder(out)
    assert (model_type, cfg2) == ("vqgan", cfg) and sd2.keys() == sd.keys()
    assert all(torch.equal(sd2[k], v) for k, v in sd.items())
    half = save_model_folder(tmp_path / "h", "vqgan", cfg, sd, dtype=torch.bfloat16)
    assert load_model_folder(half)[2]["decoder.conv_out.weight"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="model_type 'gpt' is not one of vqgan, transformer"):
        save_model_folder(tmp_path / "x", "gpt", cfg, sd)
    with pytest.raises(ValueError, match="extra_meta may not set"):
        save_model_folder(tmp_path / "x", "vqgan", cfg, sd, extra_meta={"config": {}})
    (out / "config.json").write_text(json.dumps({**meta, "format": "diffusers"}))
    with pytest.raises(ValueError, match="not a taming_dist model config"):
        load_model_folder(out)
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_model_folder(tmp_path)
