"""Codebooks that stay in use: k-means initialisation, dead-code restarts over ranks, rolling usage.

Two data-parallel ranks are simulated with threads and barrier-synchronised collectives (the
quantizers take a `Collectives` of functions at construction), so a rank's view can be compared with the other
rank's and with one process on the whole batch, at unit-test cost. The engines themselves are
compared in tests/distributed/test_engine_equivalence.py.
"""
import threading

import pytest
import torch
import torch.nn.functional as F

from taming_dist.config import QuantizerConfig
from taming_dist.models.collectives import Collectives
from taming_dist.models.quantize import (
    EMAVectorQuantizer, L2Quantizer, VectorQuantizer, build_quantizer, fold_code_offset,
)

BLOBS = torch.tensor([[4.0, 4.0], [-4.0, 4.0], [4.0, -4.0], [-4.0, -4.0]])


def _blob_batch(n_per: int = 64, seed: int = 0) -> torch.Tensor:
    """4 tight blobs in 2-D, shuffled, as z (1, 2, 1, N)."""
    g = torch.Generator().manual_seed(seed)
    x = (BLOBS.repeat_interleave(n_per, 0) + 0.1 * torch.randn(4 * n_per, 2, generator=g))
    x = x[torch.randperm(len(x), generator=g)]
    return x.t().reshape(1, 2, 1, -1)


def _rows(z: torch.Tensor) -> torch.Tensor:
    return z.reshape(z.shape[1], -1).t()


class FakeGroup:
    """Sum all-reduce and broadcast from rank 0 between threads (one per rank)."""

    def __init__(self, world: int):
        self.world, self.slots, self.barrier = world, [None] * world, threading.Barrier(world)
        self.sent: list[torch.Tensor] = []  # what rank 0 broadcast, in order

    def _exchange(self, rank: int, t: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = t.clone()
        self.barrier.wait()
        got = list(self.slots)
        self.barrier.wait()
        return got

    def reduce_fn(self, rank: int):
        return lambda t: t.copy_(torch.stack(self._exchange(rank, t)).sum(0))

    def broadcast_fn(self, rank: int):
        def fn(t):
            src = self._exchange(rank, t)[0]
            if rank == 0:
                self.sent.append(src)
            return t.copy_(src)

        return fn

    def collectives(self, rank: int, told_rank: int | None = None, broadcast=None) -> Collectives:
        """Rank `rank`'s collectives; `told_rank` is the place the quantizer is told it holds
        (its rank unless a test says otherwise), `broadcast` wraps the broadcast."""
        bcast = self.broadcast_fn(rank)
        return Collectives(reduce=self.reduce_fn(rank), broadcast=bcast if broadcast is None else broadcast(bcast),
                           rank=rank if told_rank is None else told_rank, world_size=self.world)

    def run(self, fns):
        errors = []

        def wrap(f):
            try:
                f()
            except BaseException as e:  # noqa: BLE001 (re-raised below)
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=wrap, args=(f,)) for f in fns]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]


def _replay(sent: list[torch.Tensor]) -> Collectives:
    """One process's collectives whose broadcast returns what rank 0 broadcast, in the same order
    (`sent` may still be filled after this call)."""
    it = iter(sent)
    return Collectives(broadcast=lambda t: next(it).clone())


# ----------------------------------------------------------------------------------------------
# k-means initialisation


def _assert_lloyd_fixed_point(x: torch.Tensor, codes: torch.Tensor, spherical: bool = False):
    """Every used code is the mean (spherical: the normalised mean) of the vectors nearest to it:
    what k-means converges to, whatever its start."""
    idx = (x @ codes.t()).argmax(1) if spherical else torch.cdist(x, codes).argmin(1)
    used = idx.unique()
    assert len(used) >= 2
    for k in used:
        mean = x[idx == k].mean(0)
        mean = F.normalize(mean, dim=0) if spherical else mean
        assert torch.allclose(codes[k], mean, atol=1e-4), (int(k), codes[k], mean)


@pytest.mark.parametrize("cls", [VectorQuantizer, EMAVectorQuantizer])
def test_kmeans_init_sets_the_codes_to_cluster_centres(cls):
    torch.manual_seed(0)
    q = cls(8, 2, kmeans_iters=20).train()
    before = q.codebook().detach().clone()
    z = _blob_batch()
    x = _rows(z)
    q(z)
    codes = q.codebook().detach()
    _assert_lloyd_fixed_point(x, codes)
    # every blob has a code at its centre, and the quantisation error is that of the blobs' spread
    assert torch.cdist(BLOBS, codes).min(1).values.max() < 0.5
    err = torch.cdist(x, codes).min(1).values.pow(2).mean()
    assert err < 0.05 < torch.cdist(x, before).min(1).values.pow(2).mean()
    assert q.kmeans_done == 1.0 and "kmeans_done" in q.state_dict()
    # once: a second batch (other blobs) leaves the vq codebook alone
    if cls is VectorQuantizer:
        q(_blob_batch(seed=1) + 3.0)
        assert torch.equal(q.codebook().detach(), codes)


def test_without_kmeans_init_the_codebook_is_the_original_init():
    torch.manual_seed(0)
    q = VectorQuantizer(8, 2).train()
    before = q.codebook().detach().clone()
    q(_blob_batch())
    assert torch.equal(q.codebook().detach(), before)
    assert "code_offset" not in q.state_dict() and "kmeans_done" not in q.state_dict()
    assert float(before.abs().max()) <= 1.0 / 8  # taming's uniform(-1/K, 1/K): nowhere near the blobs


def test_kmeans_init_writes_the_offset_not_the_parameter():
    """The codebook parameter (sharded under FSDP2 / ZeRO-3) is never written: the codes move
    through the replicated code_offset buffer, and gradients still reach the parameter."""
    torch.manual_seed(0)
    q = VectorQuantizer(8, 2, kmeans_iters=5).train()
    w0 = q.embedding.weight.detach().clone()
    z = _blob_batch().requires_grad_()
    zq, loss, _ = q(z)
    assert torch.equal(q.embedding.weight.detach(), w0)
    assert float(q.code_offset.abs().max()) > 1.0
    loss.backward()
    assert q.embedding.weight.grad is not None and float(q.embedding.weight.grad.abs().sum()) > 0


def test_l2_kmeans_init_is_spherical_in_the_lookup_space():
    torch.manual_seed(0)
    q = L2Quantizer(8, 4, codebook_dim=2, kmeans_iters=20).train()
    z = torch.randn(4, 4, 4, 4)
    q(z)
    hf = F.normalize(_rows(q.in_proj(z).detach().permute(1, 0, 2, 3).reshape(1, 2, 1, -1)), dim=1)
    codes = q.codebook().detach()
    assert torch.allclose(codes.norm(dim=1), torch.ones(8), atol=1e-6)
    _assert_lloyd_fixed_point(hf, codes, spherical=True)


def test_kmeans_over_two_ranks_equals_one_process_on_the_whole_batch():
    z = _blob_batch(n_per=32)  # 128 vectors: rank 0 holds the first 64, rank 1 the rest
    halves = [z[..., :64], z[..., 64:]]
    group = FakeGroup(2)
    torch.manual_seed(0)
    ranks = [VectorQuantizer(8, 2, kmeans_iters=10, collectives=group.collectives(r)).train() for r in range(2)]
    ranks[1].load_state_dict(ranks[0].state_dict())
    group.run([lambda r=r: ranks[r](halves[r]) for r in range(2)])
    one = VectorQuantizer(8, 2, kmeans_iters=10, collectives=_replay(group.sent)).train()
    one.load_state_dict(ranks[0].state_dict() | {"kmeans_done": torch.zeros(()), "code_offset": torch.zeros(8, 2)})
    one(z)
    assert torch.equal(ranks[0].codebook(), ranks[1].codebook())
    assert torch.allclose(ranks[0].codebook(), one.codebook(), atol=1e-6)
    _assert_lloyd_fixed_point(_rows(z), one.codebook().detach())
    # Negative control: a rank that is not told its place fetches the wrong rows (each rank's
    # local row i lands on the same global row), and the ranks' start differs from one process.
    group = FakeGroup(2)
    torch.manual_seed(0)
    bad = [VectorQuantizer(8, 2, kmeans_iters=10, collectives=group.collectives(r, told_rank=0)).train()
           for r in range(2)]
    bad[1].load_state_dict(bad[0].state_dict())
    group.run([lambda r=r: bad[r](halves[r]) for r in range(2)])
    assert not torch.allclose(bad[0].codebook(), one.codebook(), atol=1e-3)


def test_kmeans_refuses_unequal_rank_batches():
    group = FakeGroup(2)
    qs = [VectorQuantizer(4, 2, kmeans_iters=2, collectives=group.collectives(r)).train() for r in range(2)]
    z = _blob_batch(n_per=8)
    with pytest.raises(ValueError, match="same micro-batch size"):
        group.run([lambda: qs[0](z[..., :10]), lambda: qs[1](z[..., 10:])])


# ----------------------------------------------------------------------------------------------
# Dead-code restarts over ranks


def test_restarts_replace_exactly_the_dead_codes_on_every_rank():
    """Rank 0 hits codes 0 and 1, rank 1 code 2; code 3 is dead in the global batch only. Both
    ranks restart exactly code 3, with the same vector: the row rank 0 drew (here one that rank 1
    holds), fetched across ranks."""
    codes = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [100.0, 100.0]])
    rank_data = [torch.tensor([[0.1, 0.0], [9.0, 0.1]]), torch.tensor([[0.0, 9.5], [0.2, 9.0]])]
    group = FakeGroup(2)
    pick = torch.tensor([3])  # global row 3 = rank 1's second vector
    qs = []
    for r in range(2):
        # rank 0 broadcasts `pick` instead of its own draw
        c = group.collectives(r, broadcast=lambda f, r=r: lambda t: f(pick.clone() if r == 0 else t))
        q = VectorQuantizer(4, 2, dead_code_threshold=0.5, usage_decay=0.0, collectives=c).train()
        with torch.no_grad():
            q.embedding.weight.copy_(codes)
        qs.append(q)
    infos = [None, None]

    def step(r):
        infos[r] = qs[r](rank_data[r].t().reshape(1, 2, 1, 2))[2]

    group.run([lambda r=r: step(r) for r in range(2)])
    for q, info in zip(qs, infos):
        cb = q.codebook().detach()
        assert torch.equal(cb[:3], codes[:3]), "only the dead code may change"
        assert torch.allclose(cb[3], rank_data[1][1], atol=1e-5)
        assert float(info["restarted"]) == 1.0
    assert torch.equal(qs[0].codebook(), qs[1].codebook())
    # Negative control: with per-rank counts (no reduce) rank 0 would also call code 2 dead.
    q = VectorQuantizer(4, 2, dead_code_threshold=0.5, usage_decay=0.0).train()
    with torch.no_grad():
        q.embedding.weight.copy_(codes)
    q(rank_data[0].t().reshape(1, 2, 1, 2))
    assert not torch.equal(q.codebook().detach()[2], codes[2])


def test_ema_restarts_over_ranks_match_one_process():
    torch.manual_seed(0)
    z = torch.randn(2, 4, 4, 4) * 3
    halves = [z[:1], z[1:]]  # rank r holds image r: global rows r*16 .. r*16+15
    group = FakeGroup(2)
    qs = [EMAVectorQuantizer(16, 4, decay=0.0, dead_code_threshold=0.5, collectives=group.collectives(r)).train()
          for r in range(2)]
    qs[1].load_state_dict(qs[0].state_dict())
    one = EMAVectorQuantizer(16, 4, decay=0.0, dead_code_threshold=0.5, collectives=_replay(group.sent)).train()
    one.load_state_dict(qs[0].state_dict())
    group.run([lambda r=r: qs[r](halves[r]) for r in range(2)])
    assert group.sent and group.sent[0].numel() > 0  # codes were restarted
    info = one(z)[2]
    assert float(info["restarted"]) == group.sent[0].numel()
    for q in qs:
        for k, v in one.state_dict().items():
            assert torch.allclose(q.state_dict()[k], v, atol=1e-5), k


# ----------------------------------------------------------------------------------------------
# Rolling usage


def _hits(q, codes: list[int], ranks: int = 1) -> dict:
    """One training step of one forward (as tasks/vqgan.py drives it): the forward keeps its counts
    back, the step's fused all-reduce sums them over `ranks` identical ranks, finish_step logs them."""
    info = q(q.codebook().detach()[codes].t().reshape(1, q.e_dim, 1, len(codes)))[2]
    if not q.training:
        return info
    counts = q.take_step_counts()
    assert counts is not None and q.take_step_counts() is None, "kept back once per step"
    return {**info, **q.finish_step(counts * ranks)}


def test_window_usage_counts_codes_of_the_last_tokens():
    q = VectorQuantizer(4, 2, usage_window=8).train()
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]))
    assert float(_hits(q, [0, 0, 1, 1])["window_usage"]) == 0.5  # 4 tokens: codes 0, 1
    assert float(_hits(q, [2, 2, 2, 2])["window_usage"]) == 0.75  # 8 tokens: 0, 1, 2
    info = _hits(q, [2, 2, 2, 2])  # the last 8 tokens hit code 2 only
    assert float(info["window_usage"]) == 0.25 and float(info["usage"]) == 0.25
    q.eval()
    assert float(_hits(q, [3, 3])["window_usage"]) == 0.25  # eval forwards do not count
    # The window counts the global batch: two ranks' tokens fill it twice as fast.
    q.train()
    assert float(_hits(q, [3, 3], ranks=2)["window_usage"]) == 0.5  # 4 global tokens of code 3, 4 of code 2 before
    assert float(_hits(q, [1, 1, 1, 1], ranks=2)["window_usage"]) == 0.25  # 8 global tokens: code 1 only


def test_counts_are_kept_back_for_the_step_without_restarts_and_reduced_per_forward_with_them():
    calls = []
    counting = Collectives(reduce=lambda t: calls.append(t.shape) or t)
    q = VectorQuantizer(4, 2, collectives=counting).train()
    z = torch.randn(1, 2, 2, 2)
    q(z)
    q(z)
    assert calls == [] and float(q.take_step_counts().sum()) == 8  # two forwards of 4 vectors, no collective
    r = VectorQuantizer(4, 2, dead_code_threshold=0.5, collectives=counting).train()
    r(z)
    assert calls and r.take_step_counts() is None  # restarts need the global counts in the forward


def test_window_usage_is_not_saved_and_defaults_from_the_config():
    q = build_quantizer(QuantizerConfig(n_embed=8, embed_dim=2), 2)
    assert q.usage_window == 65536
    assert not {"last_hit", "tokens_seen"} & set(q.state_dict())  # model folders keep their keys


# ----------------------------------------------------------------------------------------------
# Export and config


def test_fold_code_offset_gives_the_same_codes_without_the_offset():
    torch.manual_seed(0)
    q = VectorQuantizer(8, 2, kmeans_iters=5).train()
    z = _blob_batch()
    q(z)
    q.eval()
    sd = fold_code_offset({f"quantize.{k}": v for k, v in q.state_dict().items()})
    plain = VectorQuantizer(8, 2).eval()  # knows only embedding.weight, like the original code
    plain.load_state_dict({"embedding.weight": sd["quantize.embedding.weight"]})
    assert torch.equal(plain(z)[2]["indices"], q(z)[2]["indices"])
    assert float(sd["quantize.code_offset"].abs().max()) == 0.0


def test_config_checks():
    with pytest.raises(ValueError, match="kmeans_init"):
        build_quantizer(QuantizerConfig(kind="gumbel", kmeans_init=True), 4)
    with pytest.raises(ValueError, match="kmeans_iters"):
        QuantizerConfig(kmeans_init=True, kmeans_iters=0).validate()
    assert build_quantizer(QuantizerConfig(kind="vq", kmeans_init=False), 4).kmeans_iters == 0


def test_a_first_stage_trained_with_kmeans_and_restarts_loads_into_a_plain_transformer_config():
    # Stage 2 builds its frozen VQGAN from the transformer's config (no k-means, no restarts); the
    # exported weights of a VQGAN trained with both carry their training-only buffers.
    import dataclasses

    from taming_dist.config import load_config
    from taming_dist.models.quantize import fold_code_offset
    from taming_dist.models.transformer import Transformer
    from taming_dist.models.vqgan import VQModel
    from taming_dist.tasks.transformer import load_first_stage

    tcfg = load_config("transformer-tiny").transformer
    fs = tcfg.first_stage
    trained_cfg = dataclasses.replace(fs, quantizer=dataclasses.replace(fs.quantizer, kmeans_init=True,
                                                                        dead_code_threshold=0.3))
    trained = VQModel(trained_cfg)
    sd = trained.state_dict()
    assert {"quantize.code_offset", "quantize.kmeans_done", "quantize.code_usage"} <= set(sd)
    sd["quantize.code_offset"] += 0.5
    with pytest.raises(ValueError, match="unfolded quantize.code_offset"):
        load_first_stage(Transformer(tcfg).first_stage_model, sd)
    folded = fold_code_offset(sd)
    model = Transformer(tcfg)
    load_first_stage(model.first_stage_model, folded)
    assert torch.equal(model.first_stage_model.quantize.embedding.weight, folded["quantize.embedding.weight"])
    folded["encoder.bogus"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="encoder.bogus"):
        load_first_stage(Transformer(tcfg).first_stage_model, folded)
