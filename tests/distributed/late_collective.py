"""A rank ends while gloo still holds a collective of its (tests/distributed/test_process_exit.py).

Under torchrun with 2 ranks: rank 1 joins an all_gather `delay` seconds late, rank 0 has already let
go of the work and its tensors, then every rank ends. `exit_process`: through
taming_dist.engines.exit_process; `shutdown`: by returning, through interpreter shutdown.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed/late_collective.py MODE DELAY
"""
import sys
import time

import torch
import torch.distributed as dist

from taming_dist.engines import env_from_environ, exit_process, init_distributed


def main() -> None:
    mode, delay = sys.argv[1], float(sys.argv[2])
    env = env_from_environ()
    init_distributed(env)
    mine, gathered = torch.ones(1000), [torch.empty(1000) for _ in range(env.world_size)]
    if env.rank == 1:
        time.sleep(delay)
    work = dist.all_gather(gathered, mine, async_op=True)
    del work, gathered, mine  # only gloo's worker thread holds them now
    print(f"rank {env.rank}: at the end", flush=True)
    if mode == "exit_process":
        exit_process(0)


if __name__ == "__main__":
    main()
