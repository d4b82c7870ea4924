import pytest
import torch
import torch.nn.functional as F

from tokenizer import VQGAN, VQGANConfig
from tokenizer.quantize import MultiScaleQuantizer

SCALES = (1, 2, 4, 8)


def tiny_msvq(**kw) -> VQGAN:
    base = dict(resolution=32, base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, z_channels=8,
                codebook_size=32, codebook_dim=4, quantizer="multiscale", scales=SCALES, phi_count=2,
                l2_normalize=False)
    base.update(kw)
    return VQGAN(VQGANConfig(**base))


def images(b=2):
    return torch.rand(b, 3, 32, 32) * 2 - 1


def test_phi_index_is_partially_shared_over_scales():
    q = MultiScaleQuantizer(16, 4, phi_count=4)   # VAR's 10 scales
    assert [q.phi_index(k) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 2, 3, 3]
    assert [MultiScaleQuantizer(16, 4, scales=(1, 2, 3, 4), phi_count=4).phi_index(k) for k in range(4)] == [0, 1, 2, 3]
    assert MultiScaleQuantizer(16, 4, scales=(4,), phi_count=4).phi_index(0) == 0


def test_sum_of_refined_scale_embeddings_reproduces_the_decoders_input():
    model = tiny_msvq().eval()
    x = images()
    z = model._latent(x)
    q = model.quantizer(z)
    ids = model.encode_scales(x)
    assert [tuple(i.shape) for i in ids] == [(2, s, s) for s in SCALES]
    assert all(torch.equal(a, b) for a, b in zip(ids, q.ids))
    f_hat = None
    for k, ids_k in enumerate(ids):
        f_hat, _ = model.next_scale_input(f_hat, ids_k, k)
    torch.testing.assert_close(f_hat, q.z_q, rtol=1e-5, atol=1e-6)
    # and decode_scales decodes exactly that map
    torch.testing.assert_close(model.decode_scales(ids), model(x).recon.clamp(-1, 1), rtol=1e-5, atol=1e-5)


def test_teacher_forcing_input_equals_step_by_step_inputs_exactly():
    model = tiny_msvq()
    ids = [torch.randint(0, 32, (3, s, s)) for s in SCALES]
    tf = model.teacher_forcing_input(ids)
    assert tf.shape == (3, 2 * 2 + 4 * 4 + 8 * 8, 4) and tf.dtype == torch.float32
    f_hat, steps = None, []
    for k, ids_k in enumerate(ids):
        f_hat, nxt = model.next_scale_input(f_hat, ids_k, k)
        if k + 1 < len(SCALES):
            assert nxt.shape == (3, SCALES[k + 1] ** 2, 4)
            steps.append(nxt)
        else:
            assert nxt is None
    assert torch.equal(tf, torch.cat(steps, dim=1))
    # the next input is the area-downsampled running sum, raster order
    f1, _ = model.next_scale_input(None, ids[0], 0)
    f2, nxt = model.next_scale_input(f1, ids[1], 1)
    assert torch.equal(nxt, F.interpolate(f2, size=(4, 4), mode="area").flatten(2).transpose(1, 2))


def test_first_scale_contribution_is_phi_of_the_broadcast_code():
    model = tiny_msvq()
    ids0 = torch.tensor([[[5]]])
    f_hat, _ = model.next_scale_input(None, ids0, 0)
    code = model.quantizer.codebook.weight[5].view(1, 4, 1, 1).expand(1, 4, 8, 8)
    torch.testing.assert_close(f_hat, model.quantizer.phis[0](code))


def test_loss_is_the_mean_over_scales_of_running_sum_errors():
    q = MultiScaleQuantizer(32, 4, scales=SCALES, phi_count=2, beta=0.25).eval()
    f = torch.randn(2, 4, 8, 8)
    out = q(f)
    f_hat, expected = None, 0.0
    for k, ids in enumerate(out.ids):
        f_hat, _ = q.next_scale_input(f_hat, ids, k)
        expected += 1.25 * F.mse_loss(f_hat, f)
    torch.testing.assert_close(out.loss, expected / len(SCALES))


def test_loss_gradient_reaches_the_encoder_only_through_the_beta_term():
    """d loss / d f = beta / K sum_k 2 (f - f_hat_k) / numel: the codebook term stops f, the commitment
    term stops f_hat_k."""
    q = MultiScaleQuantizer(32, 4, scales=SCALES, phi_count=2, beta=0.25).eval()
    f = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = q(f)
    out.loss.backward()
    f_hat, expected = None, torch.zeros_like(f)
    with torch.no_grad():
        for k, ids in enumerate(out.ids):
            f_hat, _ = q.next_scale_input(f_hat, ids, k)
            expected += 0.25 * 2 * (f - f_hat) / f.numel() / len(SCALES)
    torch.testing.assert_close(f.grad, expected)
    assert q.codebook.weight.grad.abs().sum() > 0 and all(p.grad is not None for p in q.phis.parameters())


def test_straight_through_gradient_reaches_the_encoder_output():
    q = MultiScaleQuantizer(32, 4, scales=SCALES, phi_count=2)
    f = torch.randn(2, 4, 8, 8, requires_grad=True)
    upstream = torch.randn_like(f)
    (q(f).z_q * upstream).sum().backward()
    assert torch.equal(f.grad, upstream)


def test_per_scale_usage_stats_and_restart_from_residuals():
    q = MultiScaleQuantizer(32, 4, scales=SCALES, phi_count=2, usage_window=1).train()
    f = torch.randn(4, 4, 8, 8)
    gen = torch.Generator().manual_seed(0)
    stats = q(f, generator=gen).stats
    for s in SCALES:
        assert 0 < stats[f"usage_{s}x{s}"].item() <= 1 and stats[f"perplexity_{s}x{s}"].item() >= 1
    # the coarsest scale sees 4 vectors per step: at most 4 of 32 codes
    assert stats["usage_1x1"].item() <= 4 / 32 < stats["usage"].item()
    # the restart buffer holds residuals of every scale, coarse ones included (mean of each image)
    means = f.mean(dim=(2, 3))
    assert torch.cdist(means, q.codebook.recent_RC).min(dim=1).values.max() < 1e-5
    restarted = sum(int(q(f, generator=gen).stats["restarted"]) for _ in range(3))
    assert restarted > 0
    assert q(f, generator=gen).stats["usage"].item() > stats["usage"].item()


def test_multiscale_api_errors():
    model = tiny_msvq()
    ids = [torch.zeros(1, s, s, dtype=torch.long) for s in SCALES]
    with pytest.raises(ValueError, match="use decode_scales"):
        model.decode(ids[-1])
    with pytest.raises(ValueError, match="use encode_scales"):
        model.encode(images())
    with pytest.raises(ValueError, match="expected a list of 4 id maps"):
        model.decode_scales(ids[:3])
    with pytest.raises(ValueError, match=r"ids of scale k=1 must have shape \(B, 2, 2\)"):
        model.next_scale_input(None, ids[2], 1)
    with pytest.raises(ValueError, match="scale index k=4 is out of range"):
        model.next_scale_input(None, ids[-1], 4)
    bad = list(ids)
    bad[2] = torch.full((1, 4, 4), 40)
    with pytest.raises(ValueError, match="token id 40 in ids is out of range: the codebook has 32 codes"):
        model.teacher_forcing_input(bad)
    assert model.decode_scales(ids).shape == (1, 3, 32, 32)


def test_multiscale_save_load_roundtrip(tmp_path):
    model = tiny_msvq().eval()
    model.save(tmp_path)
    loaded = VQGAN.from_pretrained(tmp_path)
    ids = model.encode_scales(images())
    assert loaded.scales == SCALES and loaded.codebook_dim == 4
    assert torch.equal(loaded.teacher_forcing_input(ids), model.teacher_forcing_input(ids))
    assert torch.equal(loaded.decode_scales(ids), model.decode_scales(ids))

