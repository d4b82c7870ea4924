import math

import pytest
import torch
import torch.nn.functional as F

from tokenizer import quantize
from tokenizer.quantize import VectorQuantizer, entropy_loss, nearest_code, perplexity


@pytest.mark.parametrize("l2", [True, False])
def test_nearest_code_matches_brute_force_cdist(l2):
    z, e = torch.randn(200, 8), torch.randn(32, 8)
    if l2:
        expected = torch.cdist(F.normalize(z, dim=-1), F.normalize(e, dim=-1)).argmin(1)
    else:
        expected = torch.cdist(z, e).argmin(1)
    assert torch.equal(nearest_code(z, e, l2), expected)


def test_nearest_code_chunking_gives_same_ids(monkeypatch):
    z, e = torch.randn(300, 8), torch.randn(64, 8)
    full = nearest_code(z, e, True)
    monkeypatch.setattr(quantize, "_LOOKUP_CHUNK", 64 * 7)   # 7 rows per chunk
    assert torch.equal(nearest_code(z, e, True), full)


def test_straight_through_gradient_equals_upstream_gradient():
    vq = VectorQuantizer(16, 4, l2_normalize=False)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = vq(z)
    upstream = torch.randn_like(z)
    (out.z_q * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)
    # forward value is the code vector of each id
    torch.testing.assert_close(out.z_q, vq.codebook.weight[out.ids].permute(0, 3, 1, 2), rtol=0, atol=1e-6)


def test_straight_through_with_l2_goes_through_the_normalisation():
    vq = VectorQuantizer(16, 4, l2_normalize=True)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    upstream = torch.randn_like(z)
    (vq(z).z_q * upstream).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    (F.normalize(z2, dim=1) * upstream).sum().backward()
    torch.testing.assert_close(z.grad, z2.grad)
    out = vq(z)
    assert torch.allclose(out.z_q.norm(dim=1), torch.ones(2, 3, 3))   # unit codes


def test_quant_loss_is_codebook_plus_beta_commitment():
    vq = VectorQuantizer(16, 4, l2_normalize=False, beta=0.25)
    z = torch.randn(2, 4, 3, 3)
    out = vq(z)
    mse = F.mse_loss(out.z_q, z)
    torch.testing.assert_close(out.loss, 1.25 * mse)
    torch.testing.assert_close(out.stats["codebook_loss"], mse)


def test_quant_loss_gradients_put_beta_on_the_encoder_side():
    """d loss / d e_v = sum over the vectors n with id v of 2 (e_v - z_n) / (N C) (codebook term, z stopped),
    d loss / d z_n = beta 2 (z_n - e_id(n)) / (N C) (commitment term, e stopped)."""
    vq = VectorQuantizer(16, 4, l2_normalize=False, beta=0.25, restart_dead_codes=False).eval()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = vq(z)
    out.loss.backward()
    z_NC, ids_N = z.detach().permute(0, 2, 3, 1).reshape(-1, 4), out.ids.flatten()
    e_NC = vq.codebook.weight.detach()[ids_N]
    numel = z_NC.numel()
    expected_w = torch.zeros(16, 4).index_add_(0, ids_N, 2 * (e_NC - z_NC) / numel)
    torch.testing.assert_close(vq.codebook.weight.grad, expected_w)
    expected_z = (0.25 * 2 * (z_NC - e_NC) / numel).view(2, 3, 3, 4).permute(0, 3, 1, 2)
    torch.testing.assert_close(z.grad, expected_z)


def test_l2_codebook_starts_with_unit_rows():
    """Only directions count with l2 codes: rows start unit-norm (at ~1/V the gradient through the
    normalisation would be ~V times larger and one step would turn a code far)."""
    assert torch.allclose(VectorQuantizer(1024, 8, l2_normalize=True).codebook.weight.norm(dim=-1), torch.ones(1024))
    plain = VectorQuantizer(1024, 8, l2_normalize=False).codebook.weight
    assert plain.abs().max() <= 1 / 1024                    # taming / VAR's uniform(-1/V, 1/V) where norms count


def test_entropy_loss_hand_made_values():
    T = 0.01
    # p1 = (0.75, 0.25), p2 = (0.25, 0.75): mean sample entropy H(0.75) minus batch entropy log 2
    probs = torch.tensor([[0.75, 0.25], [0.25, 0.75]])
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    expected = h - (-2 * 0.5 * math.log(0.5 + 1e-5))
    torch.testing.assert_close(entropy_loss(T * probs.log(), T), torch.tensor(expected), rtol=0, atol=1e-5)
    assert expected < 0
    # confident and spread over all 4 codes: about -log V (the minimum)
    confident = torch.eye(4) * 10.0
    torch.testing.assert_close(entropy_loss(confident, T), torch.tensor(-math.log(4)), rtol=0, atol=1e-4)
    # all samples confident on the same code: ~0; all uniform: 0
    same = torch.zeros(4, 4)
    same[:, 0] = 10.0
    assert abs(entropy_loss(same, T).item()) < 1e-4
    assert abs(entropy_loss(torch.zeros(4, 4), T).item()) < 1e-4


def test_entropy_weight_adds_the_entropy_term():
    vq = VectorQuantizer(16, 4, entropy_weight=0.1)
    plain = VectorQuantizer(16, 4)
    plain.load_state_dict(vq.state_dict())
    z = torch.randn(2, 4, 3, 3)
    out, ref = vq(z), plain(z)
    torch.testing.assert_close(out.loss, ref.loss + 0.1 * out.stats["entropy_loss"])


def test_perplexity_values():
    assert perplexity(torch.tensor([0, 0, 1, 1]), 4).item() == pytest.approx(2.0)
    assert perplexity(torch.tensor([3, 3, 3]), 4).item() == pytest.approx(1.0)
    assert perplexity(torch.arange(8), 8).item() == pytest.approx(8.0, rel=1e-5)


def _reachable(vq, z_NC):
    return vq.codebook.lookup(z_NC).unique().numel()


def test_dead_code_restart_revives_unused_codes():
    V, C = 16, 4
    vq = VectorQuantizer(V, C, l2_normalize=False, usage_window=2).train()
    z = torch.randn(1, C, 8, 8)   # 64 distinct encoder outputs
    z_NC = z.permute(0, 2, 3, 1).reshape(-1, C)
    used_first = set(vq.codebook.lookup(z_NC).tolist())
    assert len(used_first) < V
    gen = torch.Generator().manual_seed(1)
    restarted = [int(vq(z, generator=gen).stats["restarted"]) for _ in range(4)]
    # codes never chosen are dead once unused for `window` (2) steps: restarted at the 4th step
    assert restarted == [0, 0, 0, V - len(used_first)]
    dead = torch.tensor(sorted(set(range(V)) - used_first))
    revived = vq.codebook.weight.detach()[dead]
    assert torch.all(torch.cdist(revived, z_NC).min(dim=1).values == 0)   # = recent encoder outputs
    assert torch.equal(vq.codebook.lookup(revived), dead)                   # each one reachable
    # codes starved by the revived ones die and are restarted in turn, until all are in use
    stats = [vq(z, generator=gen).stats for _ in range(8)][-1]
    assert vq.codebook.lookup(z_NC).unique().numel() == V
    assert stats["usage"].item() == 1.0 and stats["perplexity"].item() > 8


def test_restart_is_deterministic_given_a_generator():
    z = torch.randn(1, 4, 8, 8)
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        vq = VectorQuantizer(16, 4, usage_window=1).train()
        gen = torch.Generator().manual_seed(7)
        for _ in range(4):
            vq(z, generator=gen)
        weights.append(vq.codebook.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])


def test_eval_mode_never_restarts_or_records():
    vq = VectorQuantizer(16, 4, usage_window=1).eval()
    w0 = vq.codebook.weight.detach().clone()
    for _ in range(4):
        out = vq(torch.randn(1, 4, 4, 4))
    assert torch.equal(vq.codebook.weight, w0)
    assert vq.codebook.step == 0 and int(out.stats["restarted"]) == 0
    assert out.stats["usage"].item() == 0.0   # nothing recorded
    assert torch.all(vq.codebook.last_used_GV == -1)


def test_usage_counts_codes_used_in_the_window():
    vq = VectorQuantizer(16, 4, usage_window=3, restart_dead_codes=False).train()
    z = torch.randn(1, 4, 2, 2)
    out = vq(z)
    assert out.stats["usage"].item() == pytest.approx(out.ids.unique().numel() / 16)
    assert vq.state_dict().keys() == {"codebook.weight"}   # tracking buffers are not persistent
