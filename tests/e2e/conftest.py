"""Training runs shared between the end-to-end tests: each engine's tiny VQGAN run (tests/e2e/runs.py)
is trained once per session, on first use, and read by every test that needs one (exact resume,
convert/export, the DeepSpeed world-size check). A test that would write into a run copies it first."""
import pytest

from tests.e2e.runs import CKPT_EVERY, ENGINES, STEPS, train


@pytest.fixture(scope="session")
def vqgan_run(tmp_path_factory):
    """`vqgan_run(engine)` -> the folder of that engine's shared 4-step run (trained on first use).
    Read it; copy it before writing into it."""
    done = {}
    root = tmp_path_factory.mktemp("shared_vqgan")

    def get(name):
        if name not in done:
            engine, nproc = ENGINES[name]
            train(root, name, STEPS, engine, nproc, ckpt_every=CKPT_EVERY)
            done[name] = root / name
        return done[name]

    return get
