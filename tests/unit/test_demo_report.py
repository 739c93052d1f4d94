"""The demo's prompts and its overview picture (issue 25), without training anything."""
import torch
from PIL import Image

from taming_dist.commands.demo import demo_prompts
from taming_dist.data.synthetic import CLASS_NAMES, captions, parse_caption


def test_seen_prompts_are_train_combinations_and_unseen_ones_never_are():
    seen, unseen = demo_prompts()
    train = set(captions(4096, 12, seed=0))
    assert len(seen) == 2 * len(CLASS_NAMES) and set(seen) <= train
    assert sorted(parse_caption(p)[0] for p in seen) == sorted(list(range(len(CLASS_NAMES))) * 2)
    assert len(unseen) == 6 and not set(unseen) & train and "a yellow triangle on a purple background" in unseen


def test_overview_writes_every_prompt_block_and_the_table(tmp_path):
    from taming_dist.eval.demo_report import write_examples, write_overview

    seen, unseen = demo_prompts()
    g = torch.Generator().manual_seed(0)
    samples = {p: torch.rand(3, 3, 32, 32, generator=g) * 2 - 1 for p in seen + unseen}
    hits = {p: {"samples": 3, "shape": 1, "colours": 2, "all": 1} for p in seen + unseen}
    report = {"samples": {"seen_prompts": {"per_prompt": {p: hits[p] for p in seen}},
                          "unseen_prompts": {"per_prompt": {p: hits[p] for p in unseen}}}}
    cells = [("", "value", "target", ""), ("reconstruction PSNR (dB)", "20.00", ">= 26.00", "below target")]
    write_overview(tmp_path / "o.png", torch.zeros(16, 3, 32, 32), samples, seen, unseen, report, "title", cells)
    with Image.open(tmp_path / "o.png") as im:
        width, height = im.size
    # 2 rows of 8 at 2x, 8 + 2 rows of 3 prompt blocks (3 samples of 64 px shown each), the table
    assert width >= 3 * 3 * 64 and height >= 2 * 64 + 10 * 64 + len(cells) * 12
    write_examples(tmp_path / "d.png")
    with Image.open(tmp_path / "d.png") as im:
        assert im.size[1] >= 3 * 96  # 12 classes, 4 a row, 3x scale


def test_a_demo_rerun_skips_only_a_run_finished_at_the_asked_step(tmp_path):
    from taming_dist.commands.demo import _trained

    run = tmp_path / "vqgan"
    assert not _trained(run, 12)  # nothing there
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_000006\n")
    (run / "model").mkdir()
    (run / "model" / "model.safetensors").write_bytes(b"x")
    assert not _trained(run, 12)  # stopped at step 6: launched again, and it resumes
    (run / "checkpoints" / "latest").write_text("step_000012\n")
    assert _trained(run, 12) and not _trained(run, 24)  # more steps asked for: launched again
    (run / "model" / "model.safetensors").unlink()
    assert not _trained(run, 12)  # the model folder was never written: the run did not end
