"""ClassToImagePipeline, `tessera generate` and pipelines/loading.py on tiny artefacts made here: tiny
(untrained) tokenizers and generator dirs written directly (weights + meta.json), one per family."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from generator.base import build_generator
from generator.config import GeneratorConfig
from generator.launch import STATIC_MATMUL_ENV
from pipelines.checkpoint import save_model_dir
from pipelines.config import to_dict
from pipelines.generate import ClassToImagePipeline, class_grid, family_options, static_matmuls_for
from pipelines.loading import (check_compatible, load_generator_dir, load_tokenizer, pick_device, resolve_classes,
                               write_meta)
from tests.pipelines.test_train_generator import (CLASSES, MODEL, _tiny_cpu, make_tokenizer,  # noqa: F401
                                                  run_cli, tokens_shape, user_error)


def make_generator_dir(path: Path, kind: str, tokenizer, tokenizer_hash: str | None = None, **overrides) -> Path:
    """A generator dir as train-generator writes it: config.json + model.safetensors + meta.json
    (random weights; the head, zero at init, is randomised so that draws depend on the class)."""
    torch.manual_seed(0)
    config = GeneratorConfig(kind=kind, **{**MODEL, **tokens_shape(tokenizer), **overrides})
    generator = build_generator(config)
    torch.nn.init.normal_(generator.head.weight, std=0.5)      # some preference, so classes differ
    save_model_dir(path, to_dict(config), generator.state_dict())
    write_meta(path, tokenizer_hash or tokenizer.fingerprint(), CLASSES, {"grid_size": config.grid_size})
    return path


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    vq, ms = make_tokenizer(root / "tok"), make_tokenizer(root / "tok-ms", multiscale=True)
    other = make_tokenizer(root / "tok-other", base_channels=16)
    return {"root": root, "vq": vq, "ms": ms, "other": other,
            "masked": make_generator_dir(root / "masked", "masked", vq),
            "ar": make_generator_dir(root / "ar", "ar", vq),
            "var": make_generator_dir(root / "var", "var", ms),
            "other_hash": make_generator_dir(root / "other-hash", "masked", other),
            "small_codebook": make_generator_dir(root / "small", "masked", vq, codebook_size=32)}


def tok_dir(art, kind: str) -> Path:
    return art["root"] / ("tok-ms" if kind == "var" else "tok")


@pytest.mark.parametrize("kind", ["masked", "ar", "var"])
def test_generate_cli_writes_a_grid_and_same_seed_same_bytes(tmp_path, capsys, art, kind):
    args = ["generate", "--tokenizer", tok_dir(art, kind), "--generator", art[kind], "--classes", "0", "Blue",
            "--num-per-class", "3", "--num-steps", "4", "--seed", "5"]
    code, out, err = run_cli(capsys, *args, "--out", tmp_path / "a.png", "--out-dir", tmp_path / "single")
    assert code == 0, err
    assert "wrote" in out and str(tmp_path / "a.png") in out and " s " in out
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "b.png")
    assert code == 0, err
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    grid = Image.open(tmp_path / "a.png")
    assert grid.height == 2 * (16 + 2) + 2 and grid.width > 3 * (16 + 2)
    singles = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert singles[0] == "000-red-00.png" and singles[-1] == "001-blue-02.png" and len(singles) == 6
    code, _, err = run_cli(capsys, *args[:-1], "6", "--out", tmp_path / "c.png")
    assert code == 0, err
    assert (tmp_path / "c.png").read_bytes() != (tmp_path / "a.png").read_bytes()


@pytest.mark.parametrize("kind, expected", [("masked", STATIC_MATMUL_ENV), ("ar", {}), ("var", {})])
def test_the_sampling_commands_give_cublas_no_workspace_for_a_masked_generator_only(tmp_path, capsys, art, kind,
                                                                                     expected, monkeypatch):
    """Before loading anything, ``generate`` and ``inpaint`` set cuBLAS's workspace variables for a masked
    generator (NOTES A45), where the user has not; AR and VAR sampling keep PyTorch's default."""
    for name in STATIC_MATMUL_ENV:
        monkeypatch.delenv(name, raising=False)
    assert static_matmuls_for(art[kind]) == expected
    assert {k: os.environ[k] for k in STATIC_MATMUL_ENV if k in os.environ} == expected
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")           # the user's own value stays
    monkeypatch.delenv("CUBLASLT_WORKSPACE_SIZE", raising=False)
    code, _, err = run_cli(capsys, "generate", "--tokenizer", tok_dir(art, kind), "--generator", art[kind],
                           "--classes", "0", "--num-steps", "2", "--out", tmp_path / "a.png")
    assert code == 0, err
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert os.environ.get("CUBLASLT_WORKSPACE_SIZE") == expected.get("CUBLASLT_WORKSPACE_SIZE")


def test_pipeline_is_deterministic_and_takes_names(art):
    pipe = ClassToImagePipeline.from_pretrained(tok_dir(art, "masked"), art["masked"], device="cpu")
    assert pipe.class_names == CLASSES and pipe.device == torch.device("cpu")
    a = pipe(["RED", 2, "1"], num_steps=3, seed=1, batch_size=2)
    b = pipe(["red", 2, 1], num_steps=3, seed=1, batch_size=2)
    assert len(a) == 3 and a[0].size == (16, 16) and a[0].mode == "RGB"
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    c = pipe(["red"], num_steps=3, seed=2, sampler="ancestral")              # a masked-family option
    assert not np.array_equal(np.asarray(c[0]), np.asarray(a[0]))
    assert "sampler" in family_options(pipe.generator)
    with pytest.raises(ValueError, match="unknown option 'bogus'.*valid options: .*sampler"):
        pipe(["red"], bogus=1)
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        pipe(["red"], num_steps=0)
    with pytest.raises(ValueError, match="cfg_scale must be >= 0"):
        pipe(["red"], cfg_scale=-1)


def test_resolve_classes():
    assert resolve_classes([0, "2", "GREEN", " blue "], CLASSES) == [0, 2, 1, 2]
    with pytest.raises(ValueError, match=r"class id 3 is out of range: the model has 3 classes \(0 red, 1 green"):
        resolve_classes([3], CLASSES)
    with pytest.raises(ValueError, match="class id -1 is out of range"):
        resolve_classes(["-1"], CLASSES)
    with pytest.raises(ValueError, match="unknown class name 'purple'; valid classes: 0 red, 1 green, 2 blue"):
        resolve_classes(["purple"], CLASSES)
    with pytest.raises(ValueError, match="unknown class name 'gre'"):      # exact, not a prefix
        resolve_classes(["gre"], CLASSES)
    months = sorted(str(m) for m in range(1, 13))                         # folders 1..12: '1', '10', '11', '12', '2'...
    with pytest.raises(ValueError, match="'2' is ambiguous: class id 2 is '11', class '2' has id 4; give 4"):
        resolve_classes(["2"], months)
    assert resolve_classes(["12", 4, "0"], months) == [3, 4, 0]          # '12' is no id here: the name


def test_check_compatible_names_both_sides(art):
    gen = load_generator_dir(art["other_hash"], "cpu")
    with pytest.raises(ValueError) as e:
        check_compatible(art["vq"], gen.model, gen.meta, "runs/x", "runs/tok")
    msg = str(e.value)
    assert msg.startswith(f"generator runs/x was trained on tokenizer {art['other'].fingerprint()} "
                          f"(codebook 64, grid 8), but runs/tok is {art['vq'].fingerprint()} (codebook 64, grid 8)")
    small = load_generator_dir(art["small_codebook"], "cpu")
    with pytest.raises(ValueError, match=r"codebook 32, grid 8\).*codebook 64, grid 8\): codebook sizes differ"):
        check_compatible(art["vq"], small.model, small.meta)
    var = load_generator_dir(art["var"], "cpu")
    check_compatible(art["ms"], var.model, var.meta)
    with pytest.raises(ValueError, match="needs a multiscale tokenizer"):
        check_compatible(art["vq"], var.model, {})
    masked = load_generator_dir(art["masked"], "cpu")
    with pytest.raises(ValueError, match="needs a single-scale"):
        check_compatible(art["ms"], masked.model, {})


def test_loading_errors_name_the_path(tmp_path, art):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        load_generator_dir(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text((art["masked"] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "half" / "model.safetensors")):
        load_generator_dir(tmp_path / "half")
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
        load_tokenizer(tmp_path / "nope")
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    gen = load_generator_dir(art["var"], "cpu")
    assert gen.meta["class_names"] == CLASSES and not gen.model.training
    assert not any(p.requires_grad for p in gen.model.parameters())


def test_class_grid_layout():
    images = [Image.new("RGB", (8, 8), c) for c in ("red", "red", "blue", "blue")]
    grid = class_grid(images, ["Animals & Nature", "x"], 2)
    assert grid.height == 2 * (8 + 2) + 2
    left = np.asarray(grid)[:, : grid.width - 2 * (8 + 2)]
    assert (left < 128).any()                                               # the labels are drawn
    with pytest.raises(ValueError, match="do not fill"):
        class_grid(images, ["a"], 2)


@pytest.mark.parametrize("argv, expected", [
    (["--classes", "7"], "class id 7 is out of range: the model has 3 classes (0 red, 1 green, 2 blue)"),
    (["--classes", "purple"], "unknown class name 'purple'"),
    (["--classes", "0", "--num-steps", "0"], "num_steps must be >= 1, got 0"),
    (["--classes", "0", "--cfg-scale", "-1"], "cfg_scale must be >= 0"),
    (["--classes", "0", "--num-per-class", "0"], "--num-per-class must be >= 1, got 0"),
    (["--classes", "0", "--option", "bogus=1"], "unknown option 'bogus'"),
])
def test_generate_user_errors(tmp_path, capsys, art, argv, expected):
    msg = user_error(capsys, "generate", "--tokenizer", tok_dir(art, "masked"), "--generator", art["masked"],
                     "--out", tmp_path / "g.png", *argv)
    assert expected in msg
    assert not (tmp_path / "g.png").exists()


def test_generate_refuses_a_generator_of_another_tokenizer(tmp_path, capsys, art):
    msg = user_error(capsys, "generate", "--tokenizer", tok_dir(art, "masked"), "--generator", art["other_hash"],
                     "--classes", "0", "--out", tmp_path / "g.png")
    assert art["other"].fingerprint() in msg and art["vq"].fingerprint() in msg
    msg = user_error(capsys, "generate", "--tokenizer", tok_dir(art, "masked"), "--generator", art["small_codebook"],
                     "--classes", "0", "--out", tmp_path / "g.png")
    assert "codebook 32" in msg and "codebook 64" in msg
    msg = user_error(capsys, "generate", "--tokenizer", tok_dir(art, "masked"), "--generator", art["var"],
                     "--classes", "0", "--out", tmp_path / "g.png")
    assert "multiscale" in msg
    msg = user_error(capsys, "generate", "--tokenizer", tok_dir(art, "masked"), "--generator", tmp_path / "none",
                     "--classes", "0", "--out", tmp_path / "g.png")
    assert str(tmp_path / "none") in msg
    assert json.loads((art["masked"] / "meta.json").read_text())["class_names"] == CLASSES


def test_compile_decoder_keeps_images_and_weights_and_runs_once(art, monkeypatch):
    """compile_decoder on the CPU with dynamo's 'eager' backend: the same images, the same state dict
    keys (the compiled forward is not a submodule), and a second call leaves the first wrapper."""
    from pipelines.generate import compile_decoder
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="eager"))
    tok = load_tokenizer(tok_dir(art, "vq"), "cpu")
    ids = torch.randint(0, tok.codebook_size, (2, tok.grid_size, tok.grid_size), generator=torch.Generator().manual_seed(0))
    keys, before = set(tok.state_dict()), tok.decode(ids)
    compile_decoder(tok)
    wrapper = vars(tok.decoder)["forward"]
    assert wrapper.compiled
    torch.testing.assert_close(tok.decode(ids), before)
    assert set(tok.state_dict()) == keys
    compile_decoder(tok)
    assert vars(tok.decoder)["forward"] is wrapper


@pytest.mark.parametrize("kind", ["masked", "ar", "var"])
def test_the_compile_option_reaches_every_family_and_keeps_the_images(art, kind, monkeypatch):
    """``compile=True`` is a family option of all three samplers; with dynamo's 'eager' backend (the
    real trace, eager kernels) the images equal the eager pipeline's under the same seed."""
    pipe = ClassToImagePipeline.from_pretrained(tok_dir(art, kind), art[kind], device="cpu")
    assert "compile" in family_options(pipe.generator)
    eager = pipe([0, 1], num_steps=3, cfg_scale=2.0, seed=4)
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="eager", dynamic=kw.get("dynamic"),
                                                                fullgraph=kw.get("fullgraph", False)))
    torch._dynamo.reset()
    try:
        compiled = pipe([0, 1], num_steps=3, cfg_scale=2.0, seed=4, compile=True)
    finally:
        torch._dynamo.reset()
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(eager, compiled))
