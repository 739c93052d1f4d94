"""From cluster to inference: every engine's checkpoint -> convert -> export -> from_pretrained,
the original taming layout round trip, and init_from into sharded engines."""
import json

import pytest
import torch
from safetensors.torch import load_file

from taming_dist.models import VQModel
from taming_dist.models.transformer import Transformer
from taming_dist.weights.folder import save_model_folder
from tests.distributed.harness import make_cfg
from tests.distributed.util import REPO, cli, run
from tests.e2e.runs import ENGINES, engine_params

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", engine_params(ENGINES))
def test_convert_export_from_pretrained(tmp_path, name, vqgan_run):
    """Each checkpoint layout (one engine per layout) of the session's shared 4-step run."""
    r = vqgan_run(name)
    live = r / "model"  # written in-process at the end of training (EMA weights, gathered)
    cli(["convert", r, tmp_path / "c.safetensors", "--ema"])
    cli(["export", r, tmp_path / "exp"])
    consolidated = load_file(tmp_path / "c.safetensors")
    exported = load_file(tmp_path / "exp" / "model.safetensors")
    live_sd = load_file(live / "model.safetensors")
    assert exported.keys() == live_sd.keys()
    assert any(k.startswith("discriminator.") for k in consolidated)
    for k, v in live_sd.items():
        torch.testing.assert_close(exported[k], v, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(consolidated[f"generator.{k}"], v, rtol=1e-6, atol=1e-7)
    model, ref = VQModel.from_pretrained(tmp_path / "exp"), VQModel.from_pretrained(live)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], ref(x)[0], rtol=1e-5, atol=1e-6)
    # raw weights differ from the EMA ones
    raw = tmp_path / "raw"
    cli(["export", r, raw, "--no-ema", "--dtype", "bf16"])
    raw_sd = load_file(raw / "model.safetensors")
    assert raw_sd["encoder.conv_in.weight"].dtype == torch.bfloat16
    assert not torch.equal(raw_sd["encoder.conv_in.weight"].float(), live_sd["encoder.conv_in.weight"])


@pytest.mark.one_process  # one process at a time: runs in the parallel batch (tests/conftest.py)
def test_taming_format_reimports_identically(tmp_path, vqgan_run):
    r = vqgan_run("single")
    cli(["export", r, tmp_path / "orig", "--format", "taming"])
    assert (tmp_path / "orig" / "model.yaml").exists()
    ck = torch.load(tmp_path / "orig" / "model.ckpt", weights_only=True)
    assert any(k.startswith("loss.discriminator.") for k in ck["state_dict"])
    cli(["import-taming", tmp_path / "orig" / "model.ckpt", tmp_path / "back", "--config",
         tmp_path / "orig" / "model.yaml", "--keep-loss"])
    back = load_file(tmp_path / "back" / "model.safetensors")
    live = load_file(r / "model" / "model.safetensors")
    assert back.keys() == live.keys()
    for k in live:
        assert torch.equal(back[k], live[k]), k
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())["config"]
    assert cfg["ddconfig"]["ch_mult"] == [1, 2] and cfg["quantizer"]["n_embed"] == 128


def test_init_from_export_into_fsdp_and_zero3_matches_single(tmp_path):
    """A transformer exported as a model folder starts FSDP2 and ZeRO-3 runs at the same loss as one process."""
    harness = str(REPO / "tests" / "distributed" / "harness.py")
    for d in ("one", "two"):
        (tmp_path / d).mkdir()
    src = tmp_path / "src"
    # a transformer model folder with weights no run starts from
    cfg = make_cfg("transformer", "single", 2, "fp32", False, 8)
    torch.manual_seed(123)
    m = Transformer(cfg.transformer)
    for p in m.transformer.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    save_model_folder(src, "transformer", cfg.transformer, m.state_dict())
    spec = f"transformer:{{}}:fp32:noac:init_from={src}"
    run([harness, str(tmp_path / "one"), "transformer:single:2:fp32", spec.format("single:2")])
    run([harness, str(tmp_path / "two"), spec.format("fsdp:2"), spec.format("deepspeed:3")], nproc=2)
    ones = json.loads((tmp_path / "one" / "results.json").read_text())
    fresh = ones["transformer:single:2:fp32"]["history"][0]["loss"]
    one = ones[spec.format("single:2")]["history"][0]["loss"]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert abs(one - fresh) > 1e-3  # the weights really came from the folder
    for engine in ("fsdp:2", "deepspeed:3"):
        got = two[spec.format(engine)]["history"][0]["loss"]
        assert abs(got - one) <= 1e-5 * abs(one), (engine, got, one)
