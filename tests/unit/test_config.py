from pathlib import Path

import pytest

from taming_dist.config import (
    RunConfig, TrainConfig, VQModelConfig, batch_layout, dump_config, from_dict, load_config, preset_names,
)
from taming_dist.config.load import apply_overrides

REPO = Path(__file__).resolve().parents[2]


def test_presets_all_load():
    names = preset_names()
    for required in ["vqgan-f16-1024", "vqgan-f16-16384", "gumbel-f8-8192", "gpt-cin-1.4b", "vqgan-tiny",
                     "transformer-tiny"]:
        assert required in names
    for n in names:
        assert isinstance(load_config(n), RunConfig)


def test_base_inheritance_and_overrides():
    cfg = load_config("vqgan-f16-16384", ["train.steps=7", "engine.kind=fsdp", "vqgan.ddconfig.ch_mult=[1,2]",
                                          "loss.disc_weight=0.5"])
    assert cfg.vqgan.quantizer.n_embed == 16384  # from the file
    assert cfg.vqgan.ddconfig.z_channels == 256  # inherited from the base preset
    assert cfg.loss.discriminator.n_layers == 2
    assert cfg.train.steps == 7 and cfg.engine.kind == "fsdp" and cfg.vqgan.ddconfig.ch_mult == [1, 2]
    assert cfg.loss.disc_weight == 0.5


def test_unknown_key_names_key_file_and_allowed(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("base: vqgan-tiny\nvqgan:\n  quantizer:\n    n_embeds: 12\n")
    with pytest.raises(ValueError) as e:
        load_config(str(p))
    msg = str(e.value)
    assert "vqgan.quantizer.n_embeds" in msg and "bad.yaml" in msg and "n_embed" in msg


def test_unknown_override_key_is_an_error():
    with pytest.raises(ValueError, match="train.stepz"):
        load_config("vqgan-tiny", ["train.stepz=3"])


def test_mistyped_key_suggests_the_nearest_in_yaml(tmp_path):
    p = tmp_path / "typo.yaml"
    p.write_text("base: vqgan-tiny\ntrain:\n  stpes: 3\n")
    with pytest.raises(ValueError) as e:
        load_config(str(p))
    assert "unknown config key `train.stpes` (did you mean `train.steps`?)" in str(e.value)
    assert "typo.yaml" in str(e.value)


def test_mistyped_key_suggests_the_nearest_in_overrides():
    with pytest.raises(ValueError, match=r"`train.stpes` \(did you mean `train.steps`\?\)"):
        load_config("vqgan-tiny", ["train.stpes=3"])
    with pytest.raises(ValueError, match=r"`trian` \(did you mean `train`\?\)"):
        load_config("vqgan-tiny", ["trian.steps=3"])
    with pytest.raises(ValueError) as e:  # nothing close: no guess, the allowed keys only
        load_config("vqgan-tiny", ["engine.xyzzy=1"])
    assert "did you mean" not in str(e.value) and "allowed keys of EngineConfig" in str(e.value)
    with pytest.raises(ValueError, match=r"neither a YAML file nor a preset \(did you mean `vqgan-tiny`\?\)"):
        load_config("vqgan-tiyn")


def test_presets_are_the_configs_folder_read_as_package_data():
    from taming_dist.config.load import PRESET_DIR

    configs = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    assert preset_names() == configs
    # one source: the package's presets/ is configs/ itself (a link), not a copy that could drift
    assert Path(PRESET_DIR).resolve() == (REPO / "configs").resolve()


def test_type_errors_are_clear():
    with pytest.raises(ValueError, match="train.steps.*integer"):
        load_config("vqgan-tiny", ["train.steps=abc"])
    with pytest.raises(ValueError, match="must be true or false"):
        load_config("vqgan-tiny", ["engine.compile=maybe"])


def test_validation_errors_name_values():
    with pytest.raises(ValueError, match="engine.kind 'zero'"):
        load_config("vqgan-tiny", ["engine.kind=zero"])
    with pytest.raises(ValueError, match="global_batch_size 10 is not divisible by train.micro_batch_size 4"):
        load_config("vqgan-tiny", ["train.global_batch_size=10", "train.micro_batch_size=4"])


@pytest.mark.parametrize("global_batch,dp,max_micro,expected", [
    (16, 1, None, (16, 1)), (16, 2, None, (8, 1)), (16, 4, None, (4, 1)),  # the share of each rank
    (96, 8, 12, (12, 1)), (96, 4, 12, (12, 2)), (96, 1, 12, (12, 8)),  # accumulation under the limit
    (96, 2, 10, (8, 6)),  # 48 per rank: the fewest equal micro-steps of <= 10 (48 = 6 x 8)
    (14, 1, 4, (2, 7)), (7, 1, 3, (1, 7)),  # a prime share falls back to micro batches of 1
])
def test_micro_batch_is_derived_from_the_global_batch(global_batch, dp, max_micro, expected):
    t = TrainConfig(global_batch_size=global_batch, micro_batch_size=None, max_micro_batch_size=max_micro)
    micro, accum = batch_layout(t, dp)
    assert (micro, accum) == expected
    assert micro * accum * dp == global_batch and (max_micro is None or micro <= max_micro)


def test_explicit_micro_batch_wins_and_bad_layouts_say_how_to_fix_them():
    assert batch_layout(TrainConfig(global_batch_size=16, micro_batch_size=2), 2) == (2, 4)
    with pytest.raises(ValueError, match=r"not divisible by train.micro_batch_size 16 x data-parallel size 2: "
                                         r"leave train.micro_batch_size unset"):
        batch_layout(TrainConfig(global_batch_size=16, micro_batch_size=16), 2)
    with pytest.raises(ValueError, match="not divisible by the data-parallel size 3: use a global batch"):
        batch_layout(TrainConfig(global_batch_size=16), 3)
    with pytest.raises(ValueError, match="micro_batch_size 8 exceeds train.max_micro_batch_size 4"):
        load_config("vqgan-tiny", ["train.micro_batch_size=8", "train.max_micro_batch_size=4"])
    with pytest.raises(ValueError, match="max_micro_batch_size 0 must be at least 1"):
        load_config("vqgan-tiny", ["train.max_micro_batch_size=0"])
    with pytest.raises(ValueError, match="collective_timeout_s 0 must be at least 1"):
        load_config("vqgan-tiny", ["engine.collective_timeout_s=0"])


def test_presets_leave_the_micro_batch_to_the_world_size():
    # The README's torchrun example changes the number of ranks without touching the batch.
    for name in preset_names():
        cfg = load_config(name)
        assert cfg.train.micro_batch_size is None, name
        for dp in (1, 2, 8):
            micro, accum = batch_layout(cfg.train, dp)
            assert micro * accum * dp == cfg.train.global_batch_size


def test_dump_roundtrip(tmp_path):
    cfg = load_config("gpt-cin-1.4b")
    text = dump_config(cfg, tmp_path / "c.yaml")
    again = load_config(str(tmp_path / "c.yaml"))
    assert again == cfg and "n_layer: 48" in text


def test_from_dict_nested_optional():
    cfg = from_dict(RunConfig, {"transformer": {"condition": {"kind": "tokens", "cond_vqgan": {"quantizer": {"n_embed": 7}}}}})
    assert isinstance(cfg.transformer.condition.cond_vqgan, VQModelConfig)
    assert cfg.transformer.condition.cond_vqgan.quantizer.n_embed == 7


def test_apply_overrides_creates_nested():
    assert apply_overrides({}, ["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_actnorm_discriminator_is_refused_where_its_init_would_be_lost(engine):
    # ActNorm writes its data-dependent init into parameters inside forward; sharded / fp32-master
    # engines would silently drop it. DDP and one process keep it (equivalence-tested on DDP).
    with pytest.raises(ValueError, match=f"actnorm.*engine.kind={engine}.*norm=batch or none"):
        load_config("vqgan-tiny", [f"engine.kind={engine}", "loss.discriminator.norm=actnorm"])
    load_config("vqgan-tiny", ["engine.kind=ddp", "loss.discriminator.norm=actnorm"])


@pytest.mark.parametrize("overrides,match", [
    (["engine.kind=fsdp", "engine.offload_optimizer=cpu"], "DeepSpeed settings"),
    (["engine.kind=deepspeed", "engine.zero_stage=1", "engine.offload_optimizer=cpu"], "zero_stage 2 or 3"),
    (["engine.kind=deepspeed", "engine.zero_stage=2", "engine.offload_params=cpu"], "zero_stage=3"),
    (["engine.kind=ddp", "engine.fsdp_shard_size=8"], "FSDP2 setting"),
    (["engine.kind=ddp", "engine.fsdp_wrap=root"], "FSDP2 setting"),
    (["engine.kind=fsdp", "engine.fsdp_wrap=layers"], "not one of blocks"),
    (["engine.kind=deepspeed", "engine.offload_optimizer=nvme"], "none, cpu"),
])
def test_engine_settings_are_checked(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config("vqgan-tiny", overrides)


def test_user_errors_are_one_line_and_internal_errors_keep_their_traceback(monkeypatch, capsys):
    """cli.main: a ValueError our own checks raise is one line (exit 2); the same type raised inside a
    library is a bug and propagates with its traceback."""
    import json

    import taming_dist.commands.info as info
    from taming_dist.cli import main

    def ours(args):  # a check of taming_dist's raises
        load_config("vqgan-tiny", ["engine.kind=x"])

    monkeypatch.setattr(info, "run", ours)
    assert main(["info"]) == 2
    assert "taming-dist info: error: engine.kind 'x'" in capsys.readouterr().err
    monkeypatch.setattr(info, "run", lambda args: json.loads("{"))  # a ValueError from inside the json module
    with pytest.raises(json.JSONDecodeError):
        main(["info"])
    monkeypatch.setattr(info, "run", ours)
    monkeypatch.setenv("TAMING_DIST_TRACEBACK", "1")
    with pytest.raises(ValueError, match="engine.kind"):
        main(["info"])


@pytest.mark.parametrize("key", ["train.eval_every=100", "data.eval_path=/data/val"])
def test_keys_nothing_reads_are_not_accepted(key):
    """train.eval_every and data.eval_path were accepted and never read; held-out quality is measured
    by `eval-recon` / `eval-gen` on a run's checkpoints. An unknown key is an error naming it."""
    with pytest.raises(ValueError, match="unknown config key"):
        load_config("vqgan-tiny", [key])
