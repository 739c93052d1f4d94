"""Data split over ranks x DataLoader workers, simulated in one process: each rank's stream is built
with rank=0/1, world_size=2 and num_workers=2 real worker processes, which is what webdataset's node
and worker splitting sees under torchrun."""
from taming_dist.data.stream import build_stream
from tests.unit.test_data_stream import cfg_for, make_shards, take


def test_epoch_mode_exactly_once_over_2_ranks_x_2_workers(tmp_path):
    folder = make_shards(tmp_path / "d", [6] * 8)
    per_rank = []
    for rank in (0, 1):
        stream = build_stream(cfg_for(folder, mode="epoch", num_workers=2), batch_size=4, rank=rank, world_size=2,
                              seed=0)
        assert stream.steps_per_epoch == 6  # 24 samples per rank: 2 workers x 12, 3 batches each
        batches = take(stream, 2 * stream.steps_per_epoch)
        per_rank.append(([k for b in batches[:6] for k in b["key"]], [k for b in batches[6:] for k in b["key"]]))
    everything = sorted(f"{i:06d}" for i in range(48))
    for epoch in (0, 1):
        keys = per_rank[0][epoch] + per_rank[1][epoch]
        assert len(keys) == len(set(keys)) == 48  # no duplicates
        assert sorted(keys) == everything  # union is everything
    assert per_rank[0][0] != per_rank[0][1]  # the order changes per epoch


def test_resampled_ranks_take_equal_steps_from_different_draws(tmp_path):
    folder = make_shards(tmp_path / "d", [6] * 4)
    streams = [build_stream(cfg_for(folder, num_workers=2), batch_size=3, rank=r, world_size=2, seed=0)
               for r in (0, 1)]
    assert streams[0].steps_per_epoch == streams[1].steps_per_epoch == 4  # 24 / (2 ranks x 3)
    keys = [[k for b in take(s, 4) for k in b["key"]] for s in streams]
    assert keys[0] != keys[1]
    assert all(s.epoch == 0 and s.batches_in_epoch == 4 for s in streams)
