"""LPIPS is built on the meta device and given every tensor (taming_dist/losses/lpips.py): the same
network and distances as the package's own build, without initialising the VGG16 classifier it drops."""
import warnings

import lpips
import torch
import torch.nn as nn

from taming_dist.config import VQLossConfig
from taming_dist.losses.lpips import build_lpips


def test_random_build_is_the_package_network_with_torchvision_init_and_bundled_linear_layers():
    torch.manual_seed(0)
    ours = build_lpips(VQLossConfig(lpips_backbone="random"))
    tensors = [*ours.parameters(), *ours.buffers()]
    assert all(t.device.type == "cpu" for t in tensors)  # nothing left on the meta device
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)  # the package's build
    ref_state = ref.state_dict()
    assert ours.state_dict().keys() == ref_state.keys()
    for k, v in ours.state_dict().items():
        assert v.shape == ref_state[k].shape, k
        if k.startswith(("lin", "scaling_layer")):  # the bundled v0.1 layers and the constants
            torch.testing.assert_close(v, ref_state[k], rtol=0, atol=0)
    convs = [m for m in ours.net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13
    for m in convs:  # torchvision's VGG init: Kaiming normal over fan-out, zero biases
        fan_out = m.weight.shape[0] * m.weight[0, 0].numel()
        assert abs(float(m.weight.std()) / (2.0 / fan_out) ** 0.5 - 1) < 0.1 and not m.bias.any()
    # the same network: with our backbone copied in, the package's module gives the same distances
    ref.load_state_dict(ours.state_dict())
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours(x, y), ref.eval()(x, y))
    # and it is another backbone for another seed (the init draws from the global RNG)
    torch.manual_seed(1)
    other = build_lpips(VQLossConfig(lpips_backbone="random"))
    assert not torch.equal(other.net.slice1[0].weight, ours.net.slice1[0].weight)


def test_the_dropped_vgg16_classifier_is_never_initialised(monkeypatch):
    import torchvision

    built = []
    real_init = torchvision.models.VGG.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        built.append(self.classifier[0].weight.device.type)  # 25088 x 4096: the cost this avoids

    monkeypatch.setattr(torchvision.models.VGG, "__init__", init)
    build_lpips(VQLossConfig(lpips_backbone="random"))
    assert built == ["meta"]
