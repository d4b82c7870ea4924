import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tokenizer import VQGAN, VQGANConfig
from tokenizer.quantize import VAR_SCALES


def tiny(**kw) -> VQGANConfig:
    base = dict(resolution=16, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, z_channels=8,
                codebook_size=32, codebook_dim=4)
    base.update(kw)
    return VQGANConfig(**base)


def images(b=2, res=16):
    return torch.rand(b, 3, res, res) * 2 - 1


@pytest.mark.parametrize("kw,match", [
    (dict(resolution=30, channel_mult=(1, 2, 2)), "not divisible by the downsampling factor 4"),
    (dict(codebook_dim=0), "codebook_dim must be >= 1"),
    (dict(codebook_size=1), "codebook_size must be >= 2"),
    (dict(quantizer="rvq"), "unknown model.quantizer 'rvq'"),
    (dict(channel_mult=()), "channel_mult"),
    (dict(scales=(1, 2, 8)), "only used by quantizer 'multiscale'"),
    (dict(quantizer="multiscale", scales=(1, 4, 2, 8)), "strictly increasing"),
    (dict(quantizer="multiscale", scales=(1, 2, 4)), "must end at the grid size 8"),
    (dict(quantizer="multiscale"), "model.scales must be set for a 8x8 grid"),
    (dict(quantizer="multiscale", scales=(1, 8), entropy_weight=0.1), "only supported by quantizer 'vq'"),
    (dict(phi_ratio=1.5), "phi_ratio"),
    (dict(commitment_beta=-1.0), "commitment_beta"),
])
def test_config_rejects_impossible_values(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**{"resolution": 32, "channel_mult": (1, 2, 2), **kw})


def test_config_properties_and_var_default_scales():
    c = VQGANConfig(resolution=256, channel_mult=(1, 1, 2, 2, 4), quantizer="multiscale")
    assert (c.downsample_factor, c.grid_size, c.scales) == (16, 16, VAR_SCALES)
    assert VQGANConfig().grid_size == 8


@pytest.mark.parametrize("mult,grid", [((1, 2, 2), 8), ((1, 2, 2, 2), 4), ((1, 1, 2, 2, 2), 2)])
def test_encode_decode_shapes_f4_f8_f16(mult, grid):
    model = VQGAN(tiny(resolution=32, channel_mult=mult)).eval()
    ids = model.encode(images(2, 32))
    assert ids.shape == (2, grid, grid) and ids.dtype == torch.long
    assert 0 <= ids.min() and ids.max() < 32
    out = model.decode(ids)
    assert out.shape == (2, 3, 32, 32) and out.abs().max() <= 1.0


def test_forward_matches_encode_and_decode():
    model = VQGAN(tiny()).eval()
    x = images()
    out = model(x)
    assert torch.equal(out.ids, model.encode(x))
    assert torch.equal(model.decode(out.ids.int()), model.decode(out.ids))   # int32 token caches decode too
    torch.testing.assert_close(out.recon.clamp(-1, 1), model.decode(out.ids), rtol=1e-5, atol=1e-5)
    assert out.quant_loss.ndim == 0 and {"perplexity", "usage"} <= out.stats.keys()


def test_input_validation_messages():
    model = VQGAN(tiny())
    with pytest.raises(ValueError, match=r"shape \(B, 3, 16, 16\).*got \(2, 3, 32, 32\)"):
        model.encode(images(2, 32))
    with pytest.raises(ValueError, match="float tensor"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="token id 32 in ids is out of range: the codebook has 32 codes"):
        model.decode(torch.full((1, 8, 8), 32))
    with pytest.raises(ValueError, match="token id -1"):
        model.decode(torch.full((1, 8, 8), -1))
    with pytest.raises(ValueError, match="integer tensor"):
        model.decode(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match=r"shape \(B, 8, 8\)"):
        model.decode(torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="use encode"):
        model.encode_scales(images())


def test_save_load_gives_bitwise_identical_outputs(tmp_path):
    model = VQGAN(tiny()).eval()
    model.train()(images(4))           # move the codebook off its init through a restart-free step
    model.eval().save(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["codebook_size"] == 32
    assert not any("last_used" in k or "recent" in k for k in load_file(tmp_path / "model.safetensors"))
    loaded = VQGAN.from_pretrained(tmp_path)
    assert not loaded.training and loaded.config == model.config
    x = images()
    ids = model.encode(x)
    assert torch.equal(loaded.encode(x), ids)
    assert torch.equal(loaded.decode(ids), model.decode(ids))
    assert torch.equal(loaded(x).recon, model(x).recon)
    assert loaded.config_hash() == model.config_hash()


def test_strict_load_rejects_a_wrong_state_dict(tmp_path):
    VQGAN(tiny()).save(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    state["extra.weight"] = torch.zeros(1)
    save_file(state, weights)
    with pytest.raises(ValueError, match="does not match"):
        VQGAN.from_pretrained(tmp_path)
    VQGAN(tiny(codebook_size=64)).save(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text((tmp_path / "config.json").read_text())
    with pytest.raises(ValueError, match="size mismatch"):
        VQGAN.from_pretrained(tmp_path / "other")


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        VQGAN.from_pretrained(tmp_path / "nowhere")
    VQGAN(tiny()).save(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        VQGAN.from_pretrained(tmp_path)
    VQGAN(tiny()).save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown key 'n_layers'.*config.json|config.json.*unknown key 'n_layers'"):
        VQGAN.from_pretrained(tmp_path)


def test_config_hash_is_stable_and_matches_the_pipeline_helper():
    from pipelines.config import config_hash

    a, b = VQGAN(tiny()), VQGAN(tiny(codebook_size=64))
    assert len(a.config_hash()) == 16 and int(a.config_hash(), 16) >= 0
    assert a.config_hash() == VQGAN(tiny()).config_hash() != b.config_hash()
    assert a.config_hash() == config_hash(a.config)


def test_last_layer_is_the_decoder_output_conv():
    model = VQGAN(tiny())
    assert model.last_layer is model.decoder.conv_out.weight
    assert (model.codebook_size, model.grid_size, model.codebook_dim, model.scales) == (32, 8, 4, ())


def test_fingerprint_tells_trainings_apart_and_survives_a_16_bit_copy(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    a, b = VQGAN(tiny()), VQGAN(tiny())
    torch.nn.init.normal_(b.last_layer)                      # same config, other weights
    assert a.config_hash() == b.config_hash() and a.fingerprint() != b.fingerprint()
    a.save(tmp_path / "a")
    path = tmp_path / "a" / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file({k: v.half() for k, v in load_file(str(path)).items()}, str(path), metadata=meta)
    assert VQGAN.from_pretrained(tmp_path / "a").fingerprint() == a.fingerprint()


def _gan_step(model: VQGAN, crit, images):
    """One generator loss with the GAN term and the adaptive weight, and its backward."""
    out = model(images)
    g = crit.generator_loss(images, out.recon, out.quant_loss, model.last_layer, step=0)
    g.loss.backward()
    return g, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_conv_stacks_train_like_eager():
    """compile_conv_stacks (the tokenizer's train.compile) keeps the state_dict and the step's loss and
    gradients, with the adaptive GAN weight's retain_graph gradients taken through the eager last conv."""
    from tokenizer.losses import LossConfig, VQGANLoss
    torch.manual_seed(0)
    eager = VQGAN(tiny(restart_dead_codes=False))
    compiled = VQGAN(tiny(restart_dead_codes=False))
    compiled.load_state_dict(eager.state_dict())
    crit = VQGANLoss(LossConfig(perceptual_weight=0.0, disc_start=0, disc_channels=8, disc_layers=2))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    keys = list(compiled.state_dict())
    compiled.compile_conv_stacks(channels_last=True, backend="aot_eager")
    assert list(compiled.state_dict()) == keys
    assert compiled.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    g_eager, grads_eager = _gan_step(eager, crit, images)
    g_comp, grads_comp = _gan_step(compiled, crit, images.contiguous(memory_format=torch.channels_last))
    assert g_eager.metrics["d_weight"] > 0
    for k in ("loss", "rec_loss", "g_loss", "d_weight"):
        torch.testing.assert_close(g_comp.metrics[k], g_eager.metrics[k], rtol=1e-4, atol=1e-5)
    assert grads_comp.keys() == grads_eager.keys() and "encoder.conv_in.weight" in grads_comp
    for k in grads_eager:
        torch.testing.assert_close(grads_comp[k], grads_eager[k], rtol=1e-3, atol=1e-5)
