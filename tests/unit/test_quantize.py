import pytest
import torch

from taming_dist.config import QuantizerConfig
from taming_dist.models.collectives import Collectives
from taming_dist.models.quantize import (
    EMAVectorQuantizer,
    GumbelQuantize,
    L2Quantizer,
    VectorQuantizer,
    _nearest_l2,
    build_quantizer,
)


def _grid(vectors: list[list[float]]) -> torch.Tensor:
    """N vectors of dim D -> z (1, D, 1, N)."""
    return torch.tensor(vectors).t().reshape(1, len(vectors[0]), 1, len(vectors))


def _set_codebook(q, codes: list[list[float]]) -> None:
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor(codes))


@pytest.mark.parametrize("cls", [VectorQuantizer, EMAVectorQuantizer])
def test_straight_through_gradient(cls):
    torch.manual_seed(0)
    q = cls(16, 4)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, _, _ = q(z)
    g = torch.randn_like(z_q)
    (z_q * g).sum().backward()
    assert torch.equal(z.grad, g)
    assert not torch.allclose(z_q, z)  # it did quantize


@pytest.mark.parametrize("legacy", [True, False])
def test_beta_placement(legacy):
    beta = 0.25
    q = VectorQuantizer(2, 2, beta=beta, legacy=legacy)
    _set_codebook(q, [[0.0, 0.0], [1.0, 1.0]])
    z = _grid([[0.2, 0.1], [0.9, 1.2]]).requires_grad_()
    _, loss, info = q(z)
    assert info["indices"].flatten().tolist() == [0, 1]
    # Both terms have the value mean((zq - z)^2) = (0.04 + 0.01 + 0.01 + 0.04) / 4; beta only moves gradients.
    assert loss.item() == pytest.approx(0.025 * (1 + beta))
    loss.backward()
    zq = _grid([[0.0, 0.0], [1.0, 1.0]])
    unit = 2 * (z.detach() - zq) / 4  # d mean((z - zq)^2) / dz
    z_coef, cb_coef = (1.0, beta) if legacy else (beta, 1.0)
    assert torch.allclose(z.grad, z_coef * unit)
    cb_grad = -unit.reshape(2, 2).t()  # code k receives -unit of the vector assigned to it
    assert torch.allclose(q.embedding.weight.grad, cb_coef * cb_grad)


def test_ema_update_laplace_formula():
    K, decay, eps = 3, 0.5, 1e-5
    q = EMAVectorQuantizer(K, 2, decay=decay, eps=eps).train()
    init = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    q.embedding.weight.copy_(init)
    q.ema_embed_sum.copy_(init)
    vecs = [[0.2, 0.0], [0.0, 0.2], [1.4, 1.0]]  # two to code 0, one to code 1, none to code 2
    q(_grid(vecs))
    counts = torch.tensor([2.0, 1.0, 0.0])
    sums = torch.tensor([[0.2, 0.2], [1.4, 1.0], [0.0, 0.0]])
    cs = decay * torch.ones(K) + (1 - decay) * counts
    es = decay * init + (1 - decay) * sums
    n = cs.sum()
    want = es / ((cs + eps) / (n + K * eps) * n).unsqueeze(1)
    assert torch.allclose(q.embedding.weight, want, atol=1e-6)
    # It moved toward the assigned means, and the unused code kept its vector.
    assert (q.embedding.weight[0] - torch.tensor([0.1, 0.1])).norm() < (init[0] - torch.tensor([0.1, 0.1])).norm()
    assert torch.allclose(q.embedding.weight[2], init[2], atol=1e-3)
    assert "embedding.weight" in q.state_dict() and not list(q.parameters())


def test_ema_reduce_is_the_global_batch():
    """Two identical ranks (reduce doubles) == one process holding both halves of the batch."""
    torch.manual_seed(0)
    calls = []
    doubling = Collectives(reduce=lambda t: (calls.append(t.shape), t.mul_(2))[1])
    a = EMAVectorQuantizer(8, 4, decay=0.9, collectives=doubling)
    b = EMAVectorQuantizer(8, 4, decay=0.9)
    b.load_state_dict(a.state_dict())
    z = torch.randn(2, 4, 3, 3)
    for _ in range(3):
        _, _, ia = a(z)
        _, _, ib = b(torch.cat([z, z]))
    assert calls, "the collectives. reduce was never called"
    assert torch.allclose(a.embedding.weight, b.embedding.weight, atol=1e-6)
    assert not torch.allclose(a.embedding.weight, EMAVectorQuantizer(8, 4).embedding.weight)
    assert torch.allclose(ia["perplexity"], ib["perplexity"])


def test_gumbel_hard_in_eval_soft_in_training():
    torch.manual_seed(0)
    K = 8
    q = GumbelQuantize(num_hiddens=4, embed_dim=K, n_embed=K, straight_through=False)
    with torch.no_grad():
        q.embed.weight.copy_(torch.eye(K))  # z_q is then the one-hot itself
    z = torch.randn(2, 4, 3, 3)
    q.eval()
    hard, _, info = q(z)
    assert torch.equal(hard.sum(1), torch.ones(2, 3, 3))
    assert set(hard.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(info["indices"], q.proj(z).argmax(1))
    q.train()
    soft, loss, _ = q(z)
    assert torch.allclose(soft.sum(1), torch.ones(2, 3, 3))
    assert ((soft > 0) & (soft < 1)).all()
    assert loss.item() > 0  # KL to uniform of non-uniform logits
    q.straight_through = True
    st, _, _ = q(z.requires_grad_())
    assert set(st.unique().tolist()) == {0.0, 1.0}
    st.sum().backward()  # gradients reach the input through the soft sample
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_l2_codes_are_unit_norm_before_out_proj():
    torch.manual_seed(0)
    q = L2Quantizer(32, 16, codebook_dim=4)
    seen = []
    q.out_proj.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    z = torch.randn(2, 16, 4, 4)
    z_q, _, info = q(z)
    assert z_q.shape == z.shape
    norms = seen[0].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    # The lookup is the max-cosine code, and decode-side lookup gives the same vectors.
    assert torch.allclose(q.get_codebook_entry(info["indices"]), z_q, atol=1e-5)


def test_perplexity_and_usage_known_assignment():
    calls = []
    in_place_noop = Collectives(reduce=lambda t: calls.append(1))  # returns None: the tensor itself
    q = VectorQuantizer(4, 2, collectives=in_place_noop)
    _set_codebook(q, [[0, 0], [10, 0], [0, 10], [10, 10]])
    z = _grid([[0.1, 0], [0, 0.1], [9, 0], [10, 1]])  # codes 0, 0, 1, 1
    q.eval()
    _, _, info = q(z)
    assert info["perplexity"].item() == pytest.approx(2.0, rel=1e-5)
    assert info["usage"].item() == pytest.approx(0.5)
    assert not calls, "eval must not enter a collective"
    # returning the sum, as two identical ranks
    q = VectorQuantizer(4, 2, collectives=Collectives(reduce=lambda t: t * 2)).train()
    _set_codebook(q, [[0, 0], [10, 0], [0, 10], [10, 10]])
    _, _, info = q(z)
    assert info["perplexity"].item() == pytest.approx(2.0, rel=1e-5)


def test_dead_code_restart_replaces_unused_code():
    torch.manual_seed(0)
    sent = []
    q = VectorQuantizer(4, 2, dead_code_threshold=0.5, usage_decay=0.0,
                        collectives=Collectives(broadcast=lambda t: sent.append(t.clone()))).train()
    codes = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [100.0, 100.0]])
    _set_codebook(q, codes.tolist())
    z = _grid([[0.1, 0.0], [9.0, 0.1], [0.0, 9.5], [0.2, 9.0]])  # code 3 is never hit
    q(z)
    w = q.codebook().detach()  # the parameter stays; the restart is written through code_offset
    assert torch.equal(w[:3], codes[:3]) and torch.equal(q.embedding.weight.detach(), codes)
    zrows = z.reshape(2, 4).t()
    # the row index drawn (and broadcast) is the one copied
    assert len(sent) == 1 and sent[0].shape == (1,) and torch.allclose(w[3], zrows[sent[0][0]], atol=1e-5)
    assert q.code_usage[3] == 1.0


def test_ema_dead_code_restart_resets_statistics():
    q = EMAVectorQuantizer(2, 2, decay=0.0, dead_code_threshold=0.5).train()
    q.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [50.0, 50.0]]))
    q.ema_embed_sum.copy_(q.embedding.weight)
    z = _grid([[0.1, 0.0], [0.0, 0.1]])
    q(z)
    w = q.embedding.weight
    assert any(torch.equal(w[1], r) for r in z.reshape(2, 2).t())
    # The restarted code is an average one (2 vectors / 2 codes) whose statistics reproduce it.
    assert q.ema_cluster_size[1] == 1.0 and torch.equal(q.ema_embed_sum[1], w[1])


def test_dead_code_restart_uses_broadcast_result():
    for row in (0, 1):
        arriving = Collectives(broadcast=lambda t: torch.full_like(t, row))  # rank 0's choice arriving from elsewhere
        q = VectorQuantizer(2, 2, dead_code_threshold=0.5, usage_decay=0.0, collectives=arriving).train()
        _set_codebook(q, [[0.0, 0.0], [50.0, 50.0]])
        q(_grid([[0.1, 0.0], [0.0, 0.1]]))
        assert torch.allclose(q.codebook()[1].detach(), torch.tensor([[0.1, 0.0], [0.0, 0.1]])[row], atol=1e-5)


@pytest.mark.parametrize("cls", [VectorQuantizer, EMAVectorQuantizer])
def test_distances_stay_fp32_under_autocast(cls):
    torch.manual_seed(0)
    q = cls(512, 64).eval()
    with torch.no_grad():
        q.embedding.weight.copy_(torch.randn(512, 64))
    z = torch.randn(8, 64, 8, 8)
    ref_q, ref_loss, ref = q(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_q, got_loss, got = q(z)
        naive = _nearest_l2(z.permute(0, 2, 3, 1).reshape(-1, 64), q.embedding.weight)  # matmul in bf16
    assert torch.equal(got["indices"], ref["indices"])
    assert got_q.dtype == z.dtype and torch.equal(got_q, ref_q)
    assert got_loss.dtype == torch.float32 and torch.equal(got_loss, ref_loss)
    # The check has teeth: a bf16 computation picks different codes here.
    assert not torch.equal(naive.view(8, 8, 8), ref["indices"])


def test_build_quantizer_kinds_and_errors():
    assert type(build_quantizer(QuantizerConfig(kind="vq", n_embed=8, embed_dim=4), 4)) is VectorQuantizer
    assert type(build_quantizer(QuantizerConfig(kind="ema", n_embed=8, embed_dim=4), 4)) is EMAVectorQuantizer
    g = build_quantizer(QuantizerConfig(kind="gumbel", n_embed=8, embed_dim=4), 6)
    assert isinstance(g, GumbelQuantize) and g.proj.in_channels == 6
    assert isinstance(build_quantizer(QuantizerConfig(kind="l2", n_embed=8, embed_dim=4), 4), L2Quantizer)
    with pytest.raises(ValueError, match="dead_code_threshold"):
        build_quantizer(QuantizerConfig(kind="gumbel", dead_code_threshold=0.1), 4)
    with pytest.raises(ValueError, match="kind"):
        build_quantizer(QuantizerConfig(kind="fsq"), 4)
