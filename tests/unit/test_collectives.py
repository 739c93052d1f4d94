"""Issue 22 (part 5): the collectives reach the quantizers and the discriminator through their
constructors (one `Collectives`, models/collectives.py), and the quantizers carry only what they
use: the codebook base's k-means, restarts and code_offset writes on vq / ema / l2 only."""
import pytest
import torch

from taming_dist.config import DiscriminatorConfig, QuantizerConfig, VQModelConfig
from taming_dist.config.schema import EncoderDecoderConfig
from taming_dist.models.codebook import CodebookQuantizer
from taming_dist.models.collectives import ONE_PROCESS, Collectives
from taming_dist.models.discriminator import ActNorm, NLayerDiscriminator
from taming_dist.models.quantize import QUANTIZERS, build_quantizer
from taming_dist.models.vqgan import VQModel


class Counting:
    """A one-process `Collectives` that counts what model code calls (the sum and the broadcast
    of one process are the identity)."""

    def __init__(self):
        self.reduced: list[tuple] = []
        self.broadcast: list[tuple] = []
        self.collectives = Collectives(reduce=lambda t: self.reduced.append(tuple(t.shape)),
                                       broadcast=lambda t: self.broadcast.append(tuple(t.shape)))


def _tiny_vq(**quantizer) -> VQModelConfig:
    dd = EncoderDecoderConfig(ch=32, ch_mult=[1, 1], num_res_blocks=1, attn_resolutions=[], resolution=8,
                              z_channels=4)
    return VQModelConfig(ddconfig=dd, quantizer=QuantizerConfig(**quantizer))


def test_the_vqmodel_hands_its_collectives_to_the_quantizer_whose_kmeans_and_restarts_call_them():
    fake = Counting()
    torch.manual_seed(0)
    model = VQModel(_tiny_vq(n_embed=8, embed_dim=4, kmeans_init=True, kmeans_iters=3, dead_code_threshold=2.0),
                    collectives=fake.collectives).train()
    assert model.quantize.collectives is fake.collectives
    _, _, info = model(torch.randn(2, 3, 8, 8))
    # k-means: the row count, the start rows (broadcast, then fetched), one (K, D + 1) sum per iteration
    assert fake.reduced[:2] == [(), (8, 4)] and fake.reduced[2:5] == [(8, 5)] * 3
    assert fake.broadcast[0] == (8,)
    assert float(info["restarted"]) == 8  # every code under 2x an average code: all restarted, rows drawn
    assert fake.broadcast[1:] == [(8,)]  # ... through the same broadcast
    n = len(fake.reduced)
    model.eval()(torch.randn(2, 3, 8, 8))
    assert len(fake.reduced) == n, "an eval forward enters no collective"


@pytest.mark.parametrize("kind", ["lfq", "ema"])
def test_other_kinds_reduce_through_the_constructor_collectives(kind):
    fake = Counting()
    q = (dict(kind="lfq", codebook_dim=4, n_embed=16, embed_dim=4) if kind == "lfq"
         else dict(kind="ema", n_embed=8, embed_dim=4))
    model = VQModel(_tiny_vq(**q), collectives=fake.collectives).train()
    model(torch.randn(2, 3, 8, 8))
    assert fake.reduced and not fake.broadcast  # LFQ's codebook entropy / the EMA statistics


def test_the_discriminator_hands_its_collectives_to_every_actnorm_init():
    fake = Counting()
    d = NLayerDiscriminator(DiscriminatorConfig(ndf=8, n_layers=2, norm="actnorm"), collectives=fake.collectives)
    acts = [m for m in d.modules() if isinstance(m, ActNorm)]
    assert len(acts) == 2 and all(a.collectives is fake.collectives for a in acts)
    d.train()(torch.randn(2, 3, 32, 32))
    assert len(fake.reduced) == 2 * len(acts)  # sums + count, then squared deviations, per ActNorm
    d(torch.randn(2, 3, 32, 32))
    assert len(fake.reduced) == 2 * len(acts), "initialised once"


def test_one_process_is_the_default_everywhere():
    assert VQModel(_tiny_vq(n_embed=8, embed_dim=4)).quantize.collectives is ONE_PROCESS
    d = NLayerDiscriminator(DiscriminatorConfig(ndf=8, n_layers=2, norm="actnorm"))
    assert all(m.collectives is ONE_PROCESS for m in d.modules() if isinstance(m, ActNorm))
    t = torch.ones(3)
    assert ONE_PROCESS.sum(t) is t and ONE_PROCESS.from_rank0(t) is t
    in_place = Collectives(reduce=lambda x: (x.mul_(2), None)[1])  # None: the result is the tensor itself
    assert torch.equal(in_place.sum(torch.ones(2)), torch.full((2,), 2.0))
    with pytest.raises(AttributeError):
        ONE_PROCESS.rank = 1  # frozen: a module's collectives are those it was built with


# -- what each kind carries ----------------------------------------------------------------------

CODEBOOK_ONLY = ("kmeans_iters", "kmeans_done", "code_offset", "code_usage", "_kmeans", "_kmeans_init",
                 "_kmeans_pending", "_global_rows", "_global_size", "_set_codes", "_offset_weight",
                 "_restart_dead_codes", "dead_code_threshold")


def _kind(kind: str, **kw):
    base = {"fsq": dict(levels=[3, 3], n_embed=9, embed_dim=2), "lfq": dict(codebook_dim=3, n_embed=8, embed_dim=3)}
    return build_quantizer(QuantizerConfig(kind=kind, **base.get(kind, dict(n_embed=8, embed_dim=4)), **kw), 4)


@pytest.mark.parametrize("kind", ["fsq", "lfq", "gumbel"])
def test_implicit_and_gumbel_quantizers_carry_no_codebook_machinery(kind):
    q = _kind(kind)
    assert not isinstance(q, CodebookQuantizer)
    assert [a for a in CODEBOOK_ONLY if hasattr(q, a)] == []
    buffers = {n for n, _ in q.named_buffers()}
    assert buffers <= {"last_hit", "tokens_seen", "levels", "basis", "bit_weights"}, buffers
    assert not {"kmeans_done", "code_offset", "code_usage"} & set(q.state_dict())


@pytest.mark.parametrize("kind", ["vq", "ema", "l2"])
def test_codebook_quantizers_have_kmeans_and_offset_writes(kind):
    restarts = kind != "l2"
    q = _kind(kind, kmeans_init=True, dead_code_threshold=0.1 if restarts else 0.0)
    assert isinstance(q, CodebookQuantizer) and q.kmeans_iters > 0
    for a in ("_kmeans", "_global_rows", "_set_codes", "_offset_weight"):
        assert callable(getattr(q, a))
    sd = set(q.state_dict())
    assert "kmeans_done" in sd
    assert ("code_offset" in sd) == (kind != "ema")  # ema writes its codebook buffers directly
    assert ("code_usage" in sd) == restarts and hasattr(q, "_restart_dead_codes") == restarts


def test_the_factory_covers_exactly_the_kinds_the_config_accepts():
    for kind in QUANTIZERS:
        assert type(_kind(kind)) is QUANTIZERS[kind]
    with pytest.raises(ValueError, match="not one of"):
        QuantizerConfig(kind="rq").validate()
    # the kind's options are refused by the config's validation (build_quantizer only calls it)
    with pytest.raises(ValueError, match="kmeans_init"):
        QuantizerConfig(kind="fsq", levels=[3, 3], n_embed=9, embed_dim=2, kmeans_init=True).validate()
    with pytest.raises(ValueError, match="dead_code_threshold"):
        QuantizerConfig(kind="l2", dead_code_threshold=0.1).validate()
