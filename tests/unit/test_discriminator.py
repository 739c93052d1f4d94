import pytest
import torch

from taming_dist.config import DiscriminatorConfig
from taming_dist.models.collectives import Collectives
from taming_dist.models.discriminator import ActNorm, NLayerDiscriminator


@pytest.mark.parametrize("n_layers,side", [(3, 30), (2, 14)])
def test_patch_logits_shape(n_layers, side):
    d = NLayerDiscriminator(DiscriminatorConfig(ndf=8, n_layers=n_layers))
    size = 256 if n_layers == 3 else 64
    assert d(torch.randn(2, 3, size, size)).shape == (2, 1, side, side)


@pytest.mark.parametrize("norm", ["batch", "actnorm", "none"])
def test_norm_kinds_keep_indices_and_bias_rule(norm):
    d = NLayerDiscriminator(DiscriminatorConfig(ndf=8, n_layers=3, norm=norm))
    convs = {i: m for i, m in enumerate(d.main) if isinstance(m, torch.nn.Conv2d)}
    assert sorted(convs) == [0, 2, 5, 8, 11]
    assert (convs[2].bias is None) == (norm == "batch")  # BatchNorm cancels a conv bias
    assert d(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)


def test_weights_init():
    torch.manual_seed(0)
    d = NLayerDiscriminator(DiscriminatorConfig(ndf=64, n_layers=3))
    w = d.main[8].weight
    assert abs(w.mean().item()) < 1e-3 and w.std().item() == pytest.approx(0.02, rel=0.05)
    bn = d.main[9]
    assert bn.weight.std().item() == pytest.approx(0.02, rel=0.15) and torch.all(bn.bias == 0)


def test_actnorm_data_dependent_init():
    torch.manual_seed(0)
    d = NLayerDiscriminator(DiscriminatorConfig(ndf=8, n_layers=2, norm="actnorm")).train()
    acts = [m for m in d.modules() if isinstance(m, ActNorm)]
    outs = []
    for a in acts:
        a.register_forward_hook(lambda m, i, o: outs.append(o.detach().clone()))  # before the in-place LeakyReLU
    x = torch.randn(4, 3, 32, 32) * 3 + 1
    d(x)
    for a, o in zip(acts, outs):
        assert a.initialized.item() == 1
        per_channel = o.transpose(0, 1).flatten(1)
        assert torch.allclose(per_channel.mean(1), torch.zeros(o.shape[1]), atol=1e-5)
        assert torch.allclose(per_channel.std(1), torch.ones(o.shape[1]), atol=1e-4)
    loc = acts[0].loc.detach().clone()
    d(torch.randn(4, 3, 32, 32))  # later batches do not re-initialise
    assert torch.equal(acts[0].loc.detach(), loc)
    assert set(acts[0].state_dict()) == {"loc", "scale", "initialized"}
    c = Collectives(reduce=lambda t: t)
    d = NLayerDiscriminator(DiscriminatorConfig(ndf=8, n_layers=2, norm="actnorm"), collectives=c)
    assert all(a.collectives is c for a in d.modules() if isinstance(a, ActNorm))  # given at construction


def test_actnorm_init_is_global_through_its_collectives():
    """Two ranks each holding half the batch, summed through the collectives' reduce, init as one holding all."""
    torch.manual_seed(0)
    x = torch.randn(4, 5, 3, 3) * 2 + 0.5
    whole = ActNorm(5).train()
    whole(x)
    other = x[2:].transpose(0, 1).reshape(5, -1)
    # The other rank's contribution to each of the two reductions (sums + count, then squared deviations).
    pending = [torch.cat([other.sum(1), torch.tensor([other.shape[1] * 1.0])])]

    global_mean = x.transpose(0, 1).reshape(5, -1).mean(1, keepdim=True)

    def reduce_fn(t):
        if pending:
            return t + pending.pop()
        return t + (other - global_mean).pow(2).sum(1)

    half = ActNorm(5, collectives=Collectives(reduce=reduce_fn)).train()
    half(x[:2])
    assert torch.allclose(half.loc, whole.loc, atol=1e-6) and torch.allclose(half.scale, whole.scale, atol=1e-5)
