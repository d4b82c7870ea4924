import pytest
import torch
import torch.nn as nn

from tokenizer import losses
from tokenizer.losses import LossConfig, VQGANLoss, adaptive_weight, hinge_d_loss


def tiny_loss(**kw) -> VQGANLoss:
    base = dict(perceptual_weight=0.0, disc_start=0, disc_channels=8, disc_layers=2, disc_weight=0.5)
    base.update(kw)
    return VQGANLoss(LossConfig(**base))


class TinyDecoder(nn.Module):
    """A 'decoder' whose last layer is a conv, so the adaptive weight has a real gradient to compare."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, z):
        return self.conv(z)


@pytest.mark.parametrize("kw,match", [
    (dict(reconstruction="l3"), "unknown loss.reconstruction 'l3'"),
    (dict(disc_type="stylegan"), "unknown loss.disc_type 'stylegan'"),
    (dict(disc_weight=-1.0), "disc_weight must be >= 0"),
    (dict(lecam_decay=1.0), "lecam_decay"),
    (dict(disc_norm="layer"), "disc_norm"),
    (dict(disc_layers=0), "disc_layers"),
])
def test_loss_config_rejects_impossible_values(kw, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**kw)


def test_hinge_loss_formula():
    real = torch.tensor([2.0, 0.5, -1.0])   # relu(1 - r) = 0, 0.5, 2   -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])   # relu(1 + f) = 0, 1, 2     -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))


def test_adaptive_weight_equals_hand_computed_gradient_ratio():
    dec = TinyDecoder()
    out = dec(torch.randn(2, 4, 5, 5))
    target = torch.randn_like(out)
    rec = (out - target).abs().mean()
    g = -(out * torch.randn_like(out)).mean()
    w = adaptive_weight(rec, g, dec.conv.weight)
    g_rec = torch.autograd.grad(rec, dec.conv.weight, retain_graph=True)[0]
    g_g = torch.autograd.grad(g, dec.conv.weight, retain_graph=True)[0]
    torch.testing.assert_close(w, g_rec.norm() / (g_g.norm() + 1e-4))
    assert not w.requires_grad
    assert w > 0.01
    assert adaptive_weight(rec, g, dec.conv.weight, max_weight=0.01).item() == pytest.approx(0.01)   # clamped
    with torch.no_grad():   # no gradients available (eval): 0, as taming
        assert adaptive_weight(rec.detach(), g.detach(), dec.conv.weight).item() == 0.0


def test_generator_loss_total_and_no_discriminator_gradients():
    crit = tiny_loss(reconstruction="l2", codebook_weight=2.0)
    dec = TinyDecoder()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    recon = dec(torch.randn(2, 4, 16, 16))
    quant = torch.tensor(0.3, requires_grad=True)
    out = crit.generator_loss(images, recon, quant, dec.conv.weight, step=0)
    m = out.metrics
    rec = (recon - images).square().mean()
    torch.testing.assert_close(m["rec_loss"], rec.detach())
    g = -crit.discriminator(recon).mean()
    torch.testing.assert_close(m["g_loss"], g.detach())
    torch.testing.assert_close(m["d_weight"], adaptive_weight(rec, g, dec.conv.weight))
    torch.testing.assert_close(out.loss, rec + 2.0 * quant + 0.5 * m["d_weight"] * g)
    crit.discriminator.zero_grad(set_to_none=True)
    out.loss.backward()
    assert all(p.grad is None for p in crit.discriminator.parameters())
    assert all(p.requires_grad for p in crit.discriminator.parameters())   # flags restored
    assert dec.conv.weight.grad is not None and quant.grad.item() == 2.0
    assert all(not v.requires_grad for v in m.values())


def test_no_gan_term_before_disc_start():
    crit = tiny_loss(disc_start=100)
    images, recon = torch.zeros(1, 3, 16, 16), torch.full((1, 3, 16, 16), 0.5)
    out = crit.generator_loss(images, recon, torch.tensor(0.0), None, step=99)
    assert out.loss.item() == pytest.approx(0.5) and out.metrics["d_weight"].item() == 0.0
    d = crit.discriminator_loss(images, recon, step=99)
    assert d.loss.item() == 0.0
    d.loss.backward()   # backward-able, touches nothing
    assert all(p.grad is None for p in crit.discriminator.parameters())


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_discriminator_loss_is_hinge_on_detached_reconstructions(norm):
    """Real and fake logits as D gives them alone: with batch norm the halves keep their own batch
    statistics, so D scores the fakes as the generator step does."""
    crit = tiny_loss(disc_norm=norm)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    recon = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    out = crit.discriminator_loss(images, recon, step=5)
    expected = hinge_d_loss(crit.discriminator(images), crit.discriminator(recon.detach()))
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert recon.grad is None
    assert all(p.grad is not None for p in crit.discriminator.parameters())
    assert {"disc_loss", "logits_real", "logits_fake"} <= out.metrics.keys()


def test_lecam_regulariser_value_and_ema():
    crit = tiny_loss(lecam_weight=0.1, lecam_decay=0.9)
    images, recon = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    first = crit.discriminator_loss(images, recon, step=0)
    real, fake = crit.discriminator(images), crit.discriminator(recon)
    # first update copies the means; then reg = E[relu(real - ema_fake)^2] + E[relu(ema_real - fake)^2]
    torch.testing.assert_close(crit.lecam_ema_real, real.mean().detach())
    reg = (torch.relu(real - fake.mean()).square().mean() + torch.relu(real.mean() - fake).square().mean())
    torch.testing.assert_close(first.metrics["lecam_loss"], reg.detach())
    torch.testing.assert_close(first.loss, hinge_d_loss(real, fake) + 0.1 * reg, rtol=1e-5, atol=1e-6)
    ema_real = crit.lecam_ema_real.clone()
    crit.discriminator_loss(images, recon + 0.5, step=1)
    torch.testing.assert_close(crit.lecam_ema_real, ema_real)   # same real logits: EMA unchanged
    assert "lecam_ema_real" in crit.state_dict()                # persistent for exact resume


@pytest.fixture(scope="module")
def random_lpips():
    return VQGANLoss(LossConfig(perceptual_weight=1.0, lpips_random_backbone=True, disc_channels=8, disc_layers=2))


def test_lpips_random_backbone_distance(random_lpips):
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    d = random_lpips.perceptual_loss(a, b)
    assert torch.isfinite(d) and d.item() > 0
    assert random_lpips.perceptual_loss(a, a).item() == 0.0
    assert not any(k.startswith("_lpips") or "lin0" in k for k in random_lpips.state_dict())   # not checkpointed


def test_compiled_perceptual_loss_equals_eager():
    """compile_perceptual (train.compile): NHWC VGG weights and a compiled LPIPS forward give the eager loss and
    the same gradient w.r.t. the reconstruction; nothing happens when the perceptual loss is off."""
    config = LossConfig(perceptual_weight=1.0, lpips_random_backbone=True, disc_channels=8, disc_layers=2)
    torch.manual_seed(0)
    eager, compiled = VQGANLoss(config), VQGANLoss(config)
    compiled._lpips[0].load_state_dict(eager._lpips[0].state_dict())
    compiled.compile_perceptual(channels_last=True, backend="aot_eager")
    conv = next(m for m in compiled._lpips[0].modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    recon = torch.rand(2, 3, 32, 32) * 2 - 1
    out = []
    for crit, fmt in ((eager, torch.contiguous_format), (compiled, torch.channels_last)):
        r = recon.clone(memory_format=fmt).requires_grad_()
        loss = crit.perceptual_loss(images.contiguous(memory_format=fmt), r)
        loss.backward()
        out.append((loss.detach(), r.grad))
    assert out[0][0] > 0
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-4, atol=1e-7)
    off = tiny_loss()
    off.compile_perceptual(backend="aot_eager")
    assert off._lpips == []


def test_vgg_weights_file_matches_lpips_own_construction(tmp_path):
    """Parity: our meta-device build + strict load equals lpips.LPIPS with the same VGG trunk."""
    import warnings

    import lpips
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ref = lpips.LPIPS(pretrained=True, net="vgg", pnet_rand=True, verbose=False).eval()
    # torchvision's layout: features.<i>.weight/bias (+ a classifier that LPIPS ignores)
    state = {f"features.{k.split('.', 1)[1]}": v for k, v in ref.net.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)
    torch.save(state, tmp_path / "vgg16.pth")
    ours = losses.build_lpips(str(tmp_path / "vgg16.pth"))
    assert ours.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(ours(a, b), ref(a, b).detach())
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not torchvision's VGG16"):
        losses.build_lpips(str(tmp_path / "bad.pth"))


def test_missing_vgg_weights_error_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))   # an empty hub cache
    with pytest.raises(ValueError, match=r"VGG16 weights.*loss.perceptual_weight=0"):
        VQGANLoss(LossConfig(perceptual_weight=1.0))
    with pytest.raises(ValueError, match="lpips_weights=/no/such/vgg.pth"):
        VQGANLoss(LossConfig(perceptual_weight=1.0, lpips_weights="/no/such/vgg.pth"))
    VQGANLoss(LossConfig(perceptual_weight=0.0, disc_channels=8))   # off: nothing needed
