"""Import of original-format checkpoints, built here with the original key names."""
import pytest
import torch
import yaml

from taming_dist.checkpoint.pretrained import build_model_from_folder
from taming_dist.checkpoint.taming_import import import_taming_checkpoint, save_import
from taming_dist.cli import main
from taming_dist.config import ConditionConfig, DiscriminatorConfig, GPTConfig, TransformerModelConfig, load_config
from taming_dist.models.discriminator import NLayerDiscriminator
from taming_dist.models.transformer import Transformer
from taming_dist.models.vqgan import VQModel

DD = {"double_z": False, "z_channels": 32, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
      "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0}


def _original_yaml(tmp_path, n_embed=64, target="taming.models.vqgan.VQModel", extra=None):
    params = {"embed_dim": 16, "n_embed": n_embed, "ddconfig": DD, **(extra or {}),
              "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                             "params": {"disc_conditional": False, "disc_in_channels": 3, "disc_start": 7,
                                        "disc_weight": 0.8, "codebook_weight": 1.0, "disc_num_layers": 2}}}
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump({"model": {"base_learning_rate": 4.5e-6, "target": target, "params": params}}))
    return path


def _lightning(sd, **extra):
    return {"epoch": 1, "global_step": 10, "pytorch-lightning_version": "1.0.8", "state_dict": sd,
            "optimizer_states": [{"state": {}, "param_groups": []}], "lr_schedulers": [], "callbacks": {}, **extra}


@pytest.fixture
def vq_ckpt(tmp_path):
    torch.manual_seed(0)
    cfg = load_config(str(_original_yaml_as_ours(tmp_path))).vqgan
    model = VQModel(cfg)
    disc = NLayerDiscriminator(DiscriminatorConfig(n_layers=2))
    sd = dict(model.state_dict())
    sd.update({f"loss.discriminator.{k}": v for k, v in disc.state_dict().items()})
    sd["loss.perceptual_loss.lin0.model.1.weight"] = torch.rand(1, 64, 1, 1)
    torch.save(_lightning(sd), tmp_path / "last.ckpt")
    return tmp_path / "last.ckpt", model, disc


def _original_yaml_as_ours(tmp_path):
    p = tmp_path / "ours.yaml"
    p.write_text(yaml.safe_dump({"base": "vqgan-tiny", "vqgan": {"ddconfig": DD, "quantizer": {"n_embed": 64, "embed_dim": 16}}}))
    return p


def test_vqmodel_import_matches_direct_load(tmp_path, vq_ckpt):
    path, model, disc = vq_ckpt
    result = import_taming_checkpoint(path, config=str(_original_yaml(tmp_path)), keep_loss=True)
    assert result.model_type == "vqgan" and result.report["kind"] == "vqgan" and not result.report["unexpected"]
    assert result.loss_cfg.disc_start == 7 and result.loss_cfg.discriminator.n_layers == 2
    out = save_import(result, tmp_path / "imported")
    imported = build_model_from_folder(out).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(imported(x)[0], model.eval()(x)[0], rtol=0, atol=0)
    d2 = NLayerDiscriminator(DiscriminatorConfig(n_layers=2))
    d2.load_state_dict({k[len("discriminator."):]: v for k, v in result.loss_state_dict.items()
                        if k.startswith("discriminator.")})
    for (k, a), b in zip(disc.state_dict().items(), d2.state_dict().values()):
        assert torch.equal(a, b), k
    assert (out / "loss.safetensors").exists()


def test_loss_is_dropped_and_reported_by_default(tmp_path, vq_ckpt):
    result = import_taming_checkpoint(vq_ckpt[0], config=str(_original_yaml(tmp_path)))
    assert not result.loss_state_dict
    assert "loss.discriminator.main.0.weight" in result.report["dropped"]


def test_missing_key_and_wrong_config_are_clear_errors(tmp_path, vq_ckpt):
    path = vq_ckpt[0]
    ck = torch.load(path, weights_only=True)
    del ck["state_dict"]["decoder.conv_out.weight"]
    ck["state_dict"]["extra.thing"] = torch.zeros(1)
    torch.save(ck, tmp_path / "broken.ckpt")
    with pytest.raises(ValueError, match="decoder.conv_out.weight"):
        import_taming_checkpoint(tmp_path / "broken.ckpt", config=str(_original_yaml(tmp_path)))
    with pytest.raises(ValueError, match="shape mismatches.*quantize.embedding.weight"):
        import_taming_checkpoint(path, config=str(_original_yaml(tmp_path, n_embed=32)))
    with pytest.raises(ValueError, match="no hyper-parameters"):
        import_taming_checkpoint(path)


def test_unexpected_keys_are_reported(tmp_path, vq_ckpt):
    ck = torch.load(vq_ckpt[0], weights_only=True)
    ck["state_dict"]["ema.decay"] = torch.tensor(0.99)
    torch.save(ck, tmp_path / "extra.ckpt")
    result = import_taming_checkpoint(tmp_path / "extra.ckpt", config=str(_original_yaml(tmp_path)))
    assert result.report["unexpected"] == ["ema.decay"]


def test_gumbel_import_and_hyper_parameters_from_checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = load_config("vqgan-tiny", [f"vqgan.ddconfig.{k}={v}" for k, v in DD.items() if not isinstance(v, list)] +
                      ["vqgan.ddconfig.ch_mult=[1,2]", "vqgan.ddconfig.attn_resolutions=[8]",
                       "vqgan.quantizer.kind=gumbel", "vqgan.quantizer.n_embed=64", "vqgan.quantizer.embed_dim=32"]).vqgan
    model = VQModel(cfg)
    assert "quantize.proj.weight" in model.state_dict()
    hp = {"embed_dim": 32, "n_embed": 64, "ddconfig": DD, "kl_weight": 1e-8}
    torch.save(_lightning(dict(model.state_dict()), hyper_parameters=hp), tmp_path / "g.ckpt")
    result = import_taming_checkpoint(tmp_path / "g.ckpt")
    assert result.report["kind"] == "gumbel" and result.cfg.quantizer.kind == "gumbel"
    imported = build_model_from_folder(save_import(result, tmp_path / "g")).eval()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(imported(x)[0], model.eval()(x)[0])


def test_net2net_with_depth_tokens_and_attn_masks(tmp_path):
    torch.manual_seed(0)
    first = load_config(str(_original_yaml_as_ours(tmp_path))).vqgan
    cond_vq = load_config(str(_original_yaml_as_ours(tmp_path)), ["vqgan.ddconfig.in_channels=1"]).vqgan
    tcfg = TransformerModelConfig(gpt=GPTConfig(vocab_size=64, block_size=128, n_layer=2, n_head=2, n_embd=32),
                                  condition=ConditionConfig(kind="tokens", cond_vqgan=cond_vq), first_stage=first)
    model = Transformer(tcfg)
    sd = dict(model.state_dict())
    for i in range(2):
        sd[f"transformer.blocks.{i}.attn.mask"] = torch.tril(torch.ones(128, 128)).view(1, 1, 128, 128)
    torch.save(_lightning(sd), tmp_path / "n2n.ckpt")
    vq = lambda ch: {"embed_dim": 16, "n_embed": 64, "ddconfig": {**DD, "in_channels": ch}}  # noqa: E731
    orig = {"model": {"target": "taming.models.cond_transformer.Net2NetTransformer", "params": {
        "transformer_config": {"target": "taming.modules.transformer.mingpt.GPT",
                               "params": {"vocab_size": 64, "block_size": 128, "n_layer": 2, "n_head": 2, "n_embd": 32}},
        "first_stage_config": {"target": "taming.models.vqgan.VQModel", "params": vq(3)},
        "cond_stage_config": {"target": "taming.models.vqgan.VQModel", "params": vq(1)}}}}
    (tmp_path / "n2n.yaml").write_text(yaml.safe_dump(orig))
    rc = main(["import-taming", str(tmp_path / "n2n.ckpt"), str(tmp_path / "n2n"), "--config", str(tmp_path / "n2n.yaml")])
    assert rc == 0
    imported = build_model_from_folder(tmp_path / "n2n").eval()
    assert imported.config.condition.kind == "tokens"
    idx = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(imported(idx), model.eval()(idx), rtol=0, atol=0)
