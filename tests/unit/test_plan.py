"""The memory plan (taming_dist/plan.py, `taming-dist plan`): state against the engines' measured
state, activations from saved-for-backward bytes, and the command."""
import json

import pytest
import torch
import torch.nn as nn

from taming_dist.cli import main
from taming_dist.config import load_config
from taming_dist.plan import ENGINES, SavedBytes, build_units, plan
from tests.distributed.harness import GLOBAL_BATCH, make_cfg
from tests.distributed.util import run

SIZES = ("transformer.gpt.n_layer=2", "transformer.gpt.n_embd=128")


@pytest.mark.slow
@pytest.mark.distributed
def test_state_estimate_matches_the_measured_state_of_every_engine(tmp_path):
    # One torchrun launch: bench_train sets up every engine at world size 2, bf16, and reports
    # Engine.state_bytes of rank 0 (the largest shard). --profile rides along: its phase table.
    out = tmp_path / "bench.json"
    run(["tools/bench_train.py", "--stage", "transformer", "--steps", "1", "--set", *SIZES, "--json", str(out),
         "--profile"], nproc=2)
    report = json.loads(out.read_text())
    measured = {r["engine"]: r for r in report["rows"]}
    for name, phases in report["phases_s"].items():
        assert set(phases) == {"tokenize", "transformer_forward", "transformer_backward", "optimizer_step", "other"}
        assert sum(phases.values()) == pytest.approx(measured[name]["step_s"], rel=0.05), name
    print(f"\n{'engine':<18}" + "".join(f"{k + ' est/meas MiB':>26}" for k in ("params", "grads", "optim")))
    for kind, stage in ENGINES:
        cfg = make_cfg("transformer", kind, stage or 2, "bf16", False, GLOBAL_BATCH // 2, extra=SIZES)
        row = plan(cfg, 2, [(kind, stage)])["engines"][0]
        est, meas = row["units"]["transformer"], measured[row["engine"]]
        print(f"{row['engine']:<18}" + "".join(f"{est[k] / 2**20:>15.3f} / {meas[k] / 2**20:<8.3f}"
                                              for k in ("params", "grads", "optim")))
        for k in ("params", "grads", "optim"):
            assert est[k] == pytest.approx(meas[k], rel=0.10), (row["engine"], k)
        total = sum(est[k] for k in ("params", "grads", "optim"))
        assert total == pytest.approx(sum(meas[k] for k in ("params", "grads", "optim")), rel=0.10), row["engine"]


def test_saved_bytes_counts_each_saved_storage_once():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(5, 4)
    with SavedBytes(net) as rec:
        net(x).sum()
    # Linear 1 saves x, ReLU its output, Linear 2 the same output (one storage); weights are state
    assert rec.totals()["no_ac"] == 5 * 4 * 4 + 5 * 8 * 4


@pytest.mark.parametrize("name,units", [("vqgan-tiny", ("generator", "discriminator")),
                                        ("transformer-tiny", ("transformer",))])
def test_activations_scale_with_the_micro_batch_and_checkpointing_reduces_them(name, units):
    built, _ = build_units(load_config(name, ["engine.precision=bf16"]), batches=(1, 2, 4))
    assert tuple(u.name for u in built) == units
    for u in built:
        for weights in ("fp32", "cast"):
            fit, m = u.activations(weights), u.measured[weights]
            for k in ("no_ac", "ac"):
                const, per_sample = fit[k]
                assert per_sample > 0
                assert m[4][k] == pytest.approx(const + 4 * per_sample, rel=1e-3), (u.name, weights, k)
        if u.blocks:  # blocks to checkpoint: far fewer bytes kept
            assert u.measured["cast"][4]["ac"] < 0.6 * u.measured["cast"][4]["no_ac"]
        else:
            assert u.measured["cast"][4]["ac"] == u.measured["cast"][4]["no_ac"]
    # DDP keeps fp32 weights: autocast's low-precision copies are saved as well
    assert built[0].measured["fp32"][4]["no_ac"] > built[0].measured["cast"][4]["no_ac"]


def test_plan_shards_state_and_finds_the_largest_micro_batch():
    cfg = load_config("transformer-tiny")
    report = plan(cfg, 4, gpu_mem_gib=80)
    rows = {r["engine"]: r for r in report["engines"]}
    P = report["parameters"]["transformer"]
    ddp, fsdp, z3 = (rows[e]["units"]["transformer"] for e in ("ddp", "fsdp", "deepspeed zero-3"))
    assert ddp["params"] + ddp["grads"] + ddp["optim"] == 16 * P
    assert 16 * P / 4 <= fsdp["params"] + fsdp["grads"] + fsdp["optim"] < 1.1 * 16 * P / 4
    assert z3["params"] < rows["deepspeed zero-2"]["units"]["transformer"]["params"]
    small = plan(cfg, 4, [("fsdp", 0)], gpu_mem_gib=0.5)["engines"][0]["max_micro_batch"]
    assert 0 < small["no_ac"] < rows["fsdp"]["max_micro_batch"]["no_ac"] and small["ac"] > small["no_ac"]


def test_plan_command_prints_every_engine(capsys, tmp_path):
    out = tmp_path / "plan.json"
    assert main(["plan", "vqgan-tiny", "--world", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for engine in ("ddp", "fsdp", "deepspeed zero-1", "deepspeed zero-2", "deepspeed zero-3"):
        assert f"\n{engine} " in text, engine
    assert "generator" in text and "discriminator" in text and "max micro" in text
    report = json.loads(out.read_text())
    assert [r["engine"] for r in report["engines"]][0] == "ddp" and report["world_size"] == 2
    assert main(["plan", "vqgan-tiny", "--world", "2", "--engine", "deepspeed", "--zero-stage", "3"]) == 0
    assert capsys.readouterr().out.count("deepspeed zero-") == 1
    assert main(["plan", "vqgan-tiny", "--world", "2", "--zero-stage", "3"]) == 2
    assert "--zero-stage needs --engine deepspeed" in capsys.readouterr().err
