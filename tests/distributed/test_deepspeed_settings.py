"""DeepSpeed settings beyond the ZeRO stage: ZeRO-Offload of the optimizer (ZeRO-2/3, DeepSpeedCPUAdam)
and of the parameters (ZeRO-3), and a user's own DeepSpeed JSON merged over the generated config.

Offloaded runs must give every tensor the same update as the same stage without offload (the
update-level check of test_engine_equivalence), and the engine must really run with the setting
(DeepSpeedCPUAdam as the optimizer, DeepSpeed reporting offload on, the user's keys in its config).
The CPU Adam op is JIT-built once into TORCH_EXTENSIONS_DIR (.cache/torch_extensions): about 1.5
minutes the first time on 2 cores, reused afterwards.
"""
import json

import pytest
import torch

from taming_dist.engines.deepspeed import merge_user_config
from tests.distributed.test_engine_equivalence import HARNESS, update_mismatches
from tests.distributed.util import run

OFF_OPT, OFF_PARAM = "engine.offload_optimizer=cpu", "engine.offload_params=cpu"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ds_settings")
    user = d / "user_ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 123456, "overlap_comm": False},
                                "wall_clock_breakdown": False}))
    specs = {"z2": "transformer:deepspeed:2:fp32:noac", "z2off": f"transformer:deepspeed:2:fp32:noac:{OFF_OPT}",
             "z3": "transformer:deepspeed:3:fp32:noac",
             "z3off": f"transformer:deepspeed:3:fp32:noac:{OFF_OPT}:{OFF_PARAM}",
             "user": f"transformer:deepspeed:2:fp32:noac:engine.deepspeed_config={user}"}
    run([HARNESS, str(d), *specs.values()], nproc=2, timeout=1200)
    results = json.loads((d / "results.json").read_text())
    return {k: (results[s], torch.load(d / f"{results[s]['index']}.pt", weights_only=True)) for k, s in specs.items()}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("plain,offloaded", [("z2", "z2off"), ("z3", "z3off")])
def test_offload_runs_on_cpu_adam_and_matches(runs, plain, offloaded):
    (pr, pt), (orr, ot) = runs[plain], runs[offloaded]
    layout = orr["layout"]["transformer"]
    assert layout["optimizer"] == "DeepSpeedCPUAdam" and layout["offload_optimizer"]
    assert layout["offload_param"] == (offloaded == "z3off")
    assert pr["layout"]["transformer"]["optimizer"] == "AdamW" and not pr["layout"]["transformer"]["offload_optimizer"]
    for a, b in zip(pr["history"], orr["history"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a, b)
    bad = update_mismatches(pt, ot)
    assert not bad, "\n".join(bad)


@pytest.mark.slow
@pytest.mark.distributed
def test_user_deepspeed_config_reaches_the_engine(runs):
    zero = runs["user"][0]["layout"]["transformer"]["zero"]
    assert zero["reduce_bucket_size"] == 123456 and zero["overlap_comm"] is False
    assert zero["stage"] == 2  # ours, kept
    bad = update_mismatches(runs["z2"][1], runs["user"][1])
    assert not bad, "\n".join(bad)


def test_user_config_merges_nested_and_refuses_owned_keys():
    gen = {"train_batch_size": 8, "zero_optimization": {"stage": 2, "reduce_bucket_size": 5}, "bf16": {"enabled": True}}
    merged = merge_user_config(gen, {"zero_optimization": {"reduce_bucket_size": 7, "overlap_comm": True}, "x": 1})
    assert merged == {"train_batch_size": 8, "zero_optimization": {"stage": 2, "reduce_bucket_size": 7,
                                                                   "overlap_comm": True}, "bf16": {"enabled": True}, "x": 1}
    assert gen["zero_optimization"]["reduce_bucket_size"] == 5  # the generated config is not modified
    for user, name in (({"train_batch_size": 16}, "train.global_batch_size"), ({"bf16": {"enabled": False}}, "engine.precision"),
                       ({"zero_optimization": {"stage": 3}}, "engine.zero_stage"),
                       ({"gradient_accumulation_steps": 2}, "train.micro_batch_size"),
                       ({"optimizer": {"type": "Adam"}}, "train.optim")):
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            merge_user_config(gen, user)
