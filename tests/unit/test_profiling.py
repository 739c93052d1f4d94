"""Per-phase step timing (taming_dist/profiling.py, tools/bench_train.py --profile)."""
import time

import torch

from taming_dist.engines import DistEnv, build_engine
from taming_dist.profiling import PhaseTimer, phase
from tests.distributed.harness import global_batch, make_cfg

VQGAN_PHASES = {"generator_forward", "reconstruction_loss", "gan_loss", "adaptive_weight", "generator_backward",
                "generator_optimizer_step", "discriminator_forward", "discriminator_backward",
                "discriminator_optimizer_step"}


def test_phases_are_timed_only_inside_a_timer_and_nested_ones_go_to_the_outer():
    with phase("outside"):
        pass
    with PhaseTimer() as timer:
        with phase("a"):
            time.sleep(0.05)
            with phase("inner"):
                time.sleep(0.02)
        with phase("a"):
            pass
        with phase("b"):
            time.sleep(0.01)
    with phase("after"):
        pass
    assert set(timer.seconds) == {"a", "b"}
    assert timer.calls["a"] == 2 and timer.calls["b"] == 1
    assert 0.07 <= timer.seconds["a"] < 0.5 and 0.01 <= timer.seconds["b"] < 0.3
    assert timer.depth == 0


def test_a_phase_that_raises_is_still_charged_and_the_timer_recovers():
    with PhaseTimer() as timer:
        try:
            with phase("boom"):
                raise RuntimeError("x")
        except RuntimeError:
            pass
        with phase("next"):
            pass
    assert timer.calls == {"boom": 1, "next": 1}


def _step_phases(stage: str, build):
    cfg = make_cfg(stage, "single", 2, "fp32", False, 4)
    torch.manual_seed(0)
    task = build(cfg, build_engine(cfg.engine, DistEnv(), torch.device("cpu")), 1)
    batch = {k: v[:4] for k, v in global_batch(stage, 0, cfg).items()}
    with PhaseTimer() as timer:
        t0 = time.perf_counter()
        task.train_step([batch], 0)
        total = time.perf_counter() - t0
    return timer, total


def test_every_phase_of_a_vqgan_step_is_timed_and_they_add_up_to_the_step():
    from taming_dist.train.loop import build_task

    timer, total = _step_phases("vqgan", build_task)
    assert set(timer.seconds) == VQGAN_PHASES
    assert all(timer.calls[k] == 1 for k in VQGAN_PHASES)
    assert 0.5 * total < sum(timer.seconds.values()) <= total


def test_every_phase_of_a_transformer_step_is_timed():
    from taming_dist.train.loop import build_task

    timer, total = _step_phases("transformer", build_task)
    assert set(timer.seconds) == {"tokenize", "transformer_forward", "transformer_backward", "optimizer_step"}
    assert 0.5 * total < sum(timer.seconds.values()) <= total
