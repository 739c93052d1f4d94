"""FSDP2 hybrid sharding (HSDP, `engine.fsdp_shard_size`) on 4 gloo ranks as 2 replicas x 2 shards.

The same bar as the other engines: every tensor's update after 5 steps equals the one-process
update (test_engine_equivalence.update_mismatches), both stages; the parameters really are laid out
as (Replicate, Shard(0)) on a 2 x 2 mesh with half-size local shards; and checkpoints move between
HSDP, FSDP2, DDP and one process through DCP in both directions, then train on to the unbroken
run's losses.
"""
import json

import pytest
import torch

from tests.distributed.test_engine_equivalence import EMA, HARNESS, TEXT, TEXT_ZERO, spec, update_mismatches
from tests.distributed.util import run

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
HSDP = "engine.fsdp_shard_size=2"


def _load(folder, s):
    r = json.loads((folder / "results.json").read_text())[s]
    return r, torch.load(folder / f"{r['index']}.pt", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hsdp")
    one, four, two, back = (root / n for n in ("one", "four", "two", "back"))
    for d in (one, four, two, back):
        d.mkdir()
    (four / "ckpt_one").symlink_to(one / "ckpt_one", target_is_directory=True)
    for d in (two, back):
        (d / "ckpt_hsdp").symlink_to(four / "ckpt_hsdp", target_is_directory=True)
    run([HARNESS, str(one), spec("transformer", "single"), spec("vqgan", "single"), spec("transformer", "single", EMA),
         spec("transformer", "single", TEXT),
         spec("transformer", "single", EMA, "save=2", "tag=one")], timeout=600)
    run([HARNESS, str(four), spec("transformer", "fsdp", HSDP), spec("vqgan", "fsdp", HSDP),
         spec("transformer", "fsdp", HSDP, TEXT),
         spec("transformer", "fsdp", HSDP, EMA, "save=2", "tag=hsdp"), spec("transformer", "fsdp", HSDP, EMA, "resume=one")],
        nproc=4, timeout=900)
    run([HARNESS, str(two), spec("transformer", "ddp", EMA, "resume=hsdp"), spec("transformer", "fsdp", EMA, "resume=hsdp")],
        nproc=2, timeout=600)
    run([HARNESS, str(back), spec("transformer", "single", EMA, "resume=hsdp")], timeout=300)
    return {"one": one, "four": four, "two": two, "back": back}


# the text row (issue 23): cross-attention over caption features with a key padding mask and a
# learned projection, as in test_engine_equivalence's text rows
@pytest.mark.parametrize("stage", ["vqgan", "transformer", "text"])
def test_hsdp_updates_match_one_process(runs, stage):
    extra, exclude = ((TEXT,), TEXT_ZERO) if stage == "text" else ((), None)
    stage = "transformer" if stage == "text" else stage
    ref_r, ref = _load(runs["one"], spec(stage, "single", *extra))
    got_r, got = _load(runs["four"], spec(stage, "fsdp", HSDP, *extra))
    for a, b in zip(ref_r["history"], got_r["history"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"])), (a, b)
    assert got_r["replica_spread"] == 0.0
    if extra:
        assert "context_proj.weight" in got["updates"]["transformer"]
    bad = update_mismatches(ref, got, exclude=exclude)
    assert not bad, "\n".join(bad)


def test_hsdp_lays_parameters_out_on_a_2d_mesh(runs):
    got_r, _ = _load(runs["four"], spec("transformer", "fsdp", HSDP))
    layout = got_r["layout"]["transformer"]
    assert layout["mesh"] == [2, 2]
    assert layout["placements"] == ["R", "S(0)"]  # Replicate across groups, Shard(0) within one
    assert layout["local"][0] * 2 == layout["full"][0] and layout["local"][1:] == layout["full"][1:]


@pytest.mark.parametrize("where,resumed", [
    ("four", spec("transformer", "fsdp", HSDP, EMA, "resume=one")),   # one process -> HSDP
    ("two", spec("transformer", "ddp", EMA, "resume=hsdp")),          # HSDP -> DDP
    ("two", spec("transformer", "fsdp", EMA, "resume=hsdp")),         # HSDP -> FSDP2
    ("back", spec("transformer", "single", EMA, "resume=hsdp")),      # HSDP -> one process
])
def test_checkpoints_move_between_hsdp_and_the_other_torch_engines(runs, where, resumed):
    ref_r, ref = _load(runs["one"], spec("transformer", "single", EMA))
    got_r, got = _load(runs[where], resumed)
    assert [h["step"] for h in got_r["history"]] == [2, 3, 4]
    for a, b in zip(ref_r["history"][2:], got_r["history"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a, b)
    for key in ("updates", "ema"):
        bad = update_mismatches(ref, got, key=key)
        assert not bad, "\n".join(bad)
