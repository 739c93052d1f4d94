"""The deepspeed launcher runs `taming-dist train`: 2 local CPU processes from one launcher, and two
launchers with `--no_ssh --node_rank 0/1` over a 2-host hostfile simulating 2 nodes of 1 process.

The runner has no `-m`: it is `--module`, and `--no_local_rank` keeps it from appending
`--local_rank=N` (our CLI reads LOCAL_RANK from the environment instead). Both layouts train at world
size 2, so they must log the same losses and each write a ZeRO shard per rank.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import util
from tests.distributed.util import REPO, free_port

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
STEPS = 4
TRAIN = ["--no_local_rank", "--module", "taming_dist", "train", "vqgan-tiny", f"train.steps={STEPS}",
         "train.ckpt_every=2", "train.log_every=1", "train.image_every=0", "logging.wandb_mode=disabled",
         "logging.progress=false", "data.synthetic_samples=256", "vqgan.ddconfig.ch=32", "vqgan.ddconfig.ch_mult=[1,2]",
         "vqgan.ddconfig.resolution=16", "data.size=16", "vqgan.ddconfig.attn_resolutions=[8]",
         "loss.discriminator.n_layers=1", "train.global_batch_size=4", "train.micro_batch_size=2",
         "engine.kind=deepspeed", "engine.zero_stage=2"]


def check_run(run_dir: Path) -> list:
    """The run finished, its latest checkpoint is the last step and holds one ZeRO shard per rank;
    returns the logged (step, loss) pairs."""
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert ckpt.name.endswith(f"{STEPS:06d}") and (ckpt / "manifest.json").exists(), ckpt
    shards = sorted(p.name for p in ckpt.rglob("*optim_states.pt"))
    assert len(shards) == 4, shards  # 2 units (generator, discriminator) x 2 ranks
    assert {"rank_0", "rank_1"} <= {s.split("pp_")[1].rsplit("_mp", 1)[0] for s in shards}
    rows = [json.loads(line) for line in (run_dir / "log.txt").read_text().splitlines() if line.startswith('{"step"')]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return [(r["step"], r["loss"]) for r in rows]


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    cmd = [DEEPSPEED, "--num_accelerators", "2", "--master_port", str(free_port()), *TRAIN,
           f"out_dir={out}", "name=local"]
    p = subprocess.run(cmd, cwd=REPO, env=util.test_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return out / "local"


def test_launcher_starts_two_local_cpu_processes(one_node):
    check_run(one_node)


def test_two_launchers_with_node_rank_simulate_two_nodes(one_node, tmp_path):
    # Host names in the hostfile are only labels with --no_ssh; each launcher starts its node's slots.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = free_port()
    launchers = [subprocess.Popen([DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
                                   "--master_addr", "127.0.0.1", "--master_port", str(port), *TRAIN,
                                   f"out_dir={tmp_path}", "name=two"],
                                  cwd=REPO, env=util.test_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
                 for rank in (0, 1)]
    outputs = []
    try:
        for p in launchers:
            outputs.append(p.communicate(timeout=300)[0])
    finally:
        for p in launchers:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in launchers] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    # the same world size as one node with two processes: the same losses
    assert check_run(tmp_path / "two") == check_run(one_node)
