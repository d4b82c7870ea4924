"""Bad input through the CLI (`pipelines.cli.main`): each gets exactly one line `error: ...` on stderr
that names the problem, a non-zero exit and no traceback; with --debug the exception propagates (the
full traceback). Images of any mode are not bad input: they are converted and must work.

Artefacts (tiny untrained tokenizers, one generator per family, token caches) come from artefacts.py;
the bad files are made once per module in ``bad``."""
from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines import cli
from tests.pipelines.artefacts import tiny_artefacts
from tests.pipelines.test_train_generator import _tiny_cpu  # noqa: F401  (autouse: 1 thread, no oneDNN)
from tests.pipelines.test_train_tokenizer import TINY


def run_cli(capsys, argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(capsys, argv) -> str:
    """Run the CLI; assert a non-zero exit and a stderr of exactly one `error: ` line; return it."""
    code, _, err = run_cli(capsys, argv)
    assert code != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) > len("error: ") + 10, err
    return lines[0]


def png_bomb(path: Path, side: int = 20000) -> Path:
    """A valid 1-bit PNG of side x side pixels (400 M for 20000) that compresses to ~50 KB:
    its header alone must be refused, before anything is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    packer, row = zlib.compressobj(9), b"\0" * (1 + (side + 7) // 8)    # filter byte + packed bits
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)         # 1 bit, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> dict:
    return tiny_artefacts(tmp_path_factory)


@pytest.fixture(scope="module")
def bad(art, tmp_path_factory) -> dict[str, Path]:
    """Bad files, folders and configs, each named by what is wrong with it."""
    root = tmp_path_factory.mktemp("bad")
    b = {"missing": root / "missing.png", "dir": root / "folder.png", "text": root / "text.png",
         "truncated": root / "truncated.png", "bomb": png_bomb(root / "bomb.png"), "small_mask": root / "mask8.png"}
    b["dir"].mkdir()
    b["text"].write_text("this is not a PNG\n")
    b["truncated"].write_bytes(art["image"].read_bytes()[:120])
    Image.new("L", (8, 8), 255).save(b["small_mask"])                   # the image is 16x16
    # image folders for train-tokenizer
    b["empty_folder"] = root / "empty"
    b["empty_folder"].mkdir()
    b["one_class"] = root / "one-class"
    (b["one_class"] / "red").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (20, 20), "red").save(b["one_class"] / "red" / f"{i}.png")
    # run configs
    tok_cfg = {**TINY, "data": {"resolution": 32, "dataset": str(b["one_class"])}}
    b["tok_config"] = write_yaml(root / "tok.yaml", tok_cfg)
    b["unknown_key"] = write_yaml(root / "unknown-key.yaml", {**tok_cfg, "model": {**TINY["model"], "bogus": 1}})
    gen_cfg = yaml.safe_load(art["config"].read_text())
    b["wrong_type"] = write_yaml(root / "wrong-type.yaml", {**gen_cfg, "model": {**gen_cfg["model"], "dim": "big"}})
    b["impossible"] = write_yaml(root / "impossible.yaml", {**tok_cfg, "model": {**TINY["model"], "resolution": 30}})
    (root / "broken.yaml").write_text("model: [1, 2\n  dim: {\n")
    b["broken_yaml"] = root / "broken.yaml"
    # model dirs missing one file, or holding a corrupt one
    for kind, src in (("generator", art["masked"]), ("tokenizer", art["tok"])):
        for name in ("config.json", "model.safetensors"):
            b[f"{kind}_without_{name}"] = shutil.copytree(src, root / f"{kind}-without-{name}")
            (b[f"{kind}_without_{name}"] / name).unlink()
        b[f"{kind}_corrupt_weights"] = shutil.copytree(src, root / f"{kind}-corrupt")
        (b[f"{kind}_corrupt_weights"] / "model.safetensors").write_bytes(b"\0" * 16)
    b["generator_config_wrong_type"] = edited_copy(art["masked"], root / "gen-dim-big", "config.json", dim="big")
    b["generator_other_shape"] = edited_copy(art["masked"], root / "gen-dim-64", "config.json", dim=64)
    b["generator_bad_meta"] = edited_copy(art["masked"], root / "gen-bad-meta", "meta.json", class_names=3)
    b["tokenizer_other_weights"] = edited_copy(art["tok"], root / "tok-other-weights", "config.json")
    (b["tokenizer_other_weights"] / "model.safetensors").write_bytes(
        (art["tok_other"] / "model.safetensors").read_bytes())             # base_channels 16, the config says 8
    return b


def edited_copy(src: Path, dst: Path, name: str, **changes) -> Path:
    """A copy of model dir ``src`` whose JSON file ``name`` has ``changes`` applied."""
    shutil.copytree(src, dst)
    data = json.loads((dst / name).read_text())
    (dst / name).write_text(json.dumps({**data, **changes}))
    return dst


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(f"# tessera ... --config {path.name}\n" + yaml.safe_dump(config))
    return path


def generate(a, *extra, generator=None):
    return ["generate", "--tokenizer", a["tok"], "--generator", generator or a["masked"], "--num-steps", "2",
            "--out", a["root"] / "never-written.png", *extra]


def inpaint(a, *extra, image=None, out=None):
    return ["inpaint", "--tokenizer", a["tok"], "--generator", a["masked"], "--image", image or a["image"],
            "--num-steps", "2", "--out", out or a["root"] / "never-written.png", *extra]


def without_out(a, argv: list) -> list:
    """``argv`` of ``generate`` or ``inpaint`` without its ``--out``: a command given no output at all."""
    i = argv.index("--out")
    assert argv[i + 1] == a["root"] / "never-written.png"
    return argv[:i] + argv[i + 2:]


def reconstruct(a, image, tokenizer=None, out=None):
    return ["reconstruct", "--tokenizer", tokenizer or a["tok"], "--image", image,
            "--out", out or a["root"] / "never-written.png"]


def train_tokenizer(a, b, *extra, config=None):
    return ["train-tokenizer", "--config", config or b["tok_config"], "--output", a["root"] / "never-trained",
            *extra]


def train_generator(a, *extra, config=None, tokens=None):
    return ["train-generator", "--config", config or a["config"], "--tokens", tokens or a["tokens"],
            "--output", a["root"] / "never-trained", *extra]


BOX = ("--box", "0", "0", "8", "8")

# (id, argv from (artefacts, bad files), text the one error line must contain)
CASES = [
    # classes
    ("generate-class-id-out-of-range", lambda a, b: generate(a, "--classes", "0", "7"),
     "class id 7 is out of range: the model has 3 classes (0 red, 1 green, 2 blue)"),
    ("generate-class-id-negative", lambda a, b: generate(a, "--classes", "-1"), "class id -1 is out of range"),
    ("generate-unknown-class-name", lambda a, b: generate(a, "--classes", "purple"),
     "unknown class name 'purple'; valid classes: 0 red, 1 green, 2 blue"),
    ("generate-non-integer-class-id", lambda a, b: generate(a, "--classes", "1.5"),
     "class id '1.5' is not an integer; valid classes: 0 red"),
    ("inpaint-class-id-out-of-range", lambda a, b: inpaint(a, *BOX, "--class", "3"),
     "class id 3 is out of range: the model has 3 classes"),
    ("inpaint-unknown-class-name", lambda a, b: inpaint(a, *BOX, "--class", "Purple"), "unknown class name 'Purple'"),
    ("inpaint-non-integer-class-id", lambda a, b: inpaint(a, *BOX, "--class", "2.0"),
     "class id '2.0' is not an integer"),
    # masks and boxes
    ("mask-and-image-sizes-differ", lambda a, b: inpaint(a, "--mask", b["small_mask"]),
     "the mask is 8x8 but the image is 16x16"),
    ("box-outside-the-image", lambda a, b: inpaint(a, "--box", "4", "4", "20", "8"),
     "box (4, 4, 20, 8) is outside the 16x16 image or empty (need 0 <= x0 < x1 <= 16, 0 <= y0 < y1 <= 16)"),
    ("box-empty", lambda a, b: inpaint(a, "--box", "4", "4", "4", "8"),
     "box (4, 4, 4, 8) is outside the 16x16 image or empty"),
    ("box-negative", lambda a, b: inpaint(a, "--box", "-2", "0", "8", "8"), "box (-2, 0, 8, 8) is outside"),
    ("mask-file-missing", lambda a, b: inpaint(a, "--mask", b["missing"]), "mask not found: "),
    # image files
    ("image-missing", lambda a, b: inpaint(a, *BOX, image=b["missing"]), "image not found: "),
    ("image-is-a-text-file", lambda a, b: inpaint(a, *BOX, image=b["text"]), "text.png is not an image PIL can read"),
    ("image-truncated", lambda a, b: inpaint(a, *BOX, image=b["truncated"]),
     "truncated.png could not be decoded (image file is truncated); is the file truncated or corrupt?"),
    ("image-is-a-directory", lambda a, b: inpaint(a, *BOX, image=b["dir"]), "folder.png is a directory, not an image"),
    ("image-decompression-bomb", lambda a, b: inpaint(a, *BOX, image=b["bomb"]),
     "bomb.png is too large: more than 67108864 pixels (decompression bomb guard)"),
    ("reconstruct-text-file", lambda a, b: reconstruct(a, b["text"]), "text.png is not an image PIL can read"),
    ("reconstruct-truncated", lambda a, b: reconstruct(a, b["truncated"]), "truncated.png could not be decoded"),
    ("reconstruct-directory", lambda a, b: reconstruct(a, b["dir"]), "is a directory, not an image"),
    ("reconstruct-bomb", lambda a, b: reconstruct(a, b["bomb"]), "is too large: more than 67108864 pixels"),
    # datasets and token caches
    ("dataset-folder-empty", lambda a, b: train_tokenizer(a, b, "--set", f"data.dataset={b['empty_folder']}"),
     "has no class subfolders (expected "),
    ("dataset-folder-single-class", lambda a, b: train_tokenizer(a, b),
     "has a single class folder ('red'): class-conditional training needs at least 2 classes"),
    ("dataset-folder-missing", lambda a, b: train_tokenizer(a, b, "--set", f"data.dataset={b['missing']}"),
     "is neither 'emoji' nor an existing image folder"),
    ("tokens-from-another-tokenizer", lambda a, b: train_generator(a, "--tokenizer", a["tok"],
                                                                   tokens=a["tokens_other"]),
     "were made by tokenizer {other}, but the tokenizer given is {vq}"),
    ("tokens-dir-missing", lambda a, b: train_generator(a, tokens=b["missing"]), "token directory not found: "),
    ("tokens-dir-not-a-cache", lambda a, b: train_generator(a, tokens=b["empty_folder"]),
     "info.json is missing (tokenize the dataset first)"),
    # configs
    ("config-unknown-key", lambda a, b: train_tokenizer(a, b, config=b["unknown_key"]),
     "unknown key 'model.bogus' for VQGANConfig; valid keys: base_channels, channel_mult"),
    ("config-unknown-key-set", lambda a, b: train_generator(a, "--set", "model.depht=3"),
     "unknown key 'model.depht' for GeneratorConfig; valid keys: "),
    ("config-wrong-type", lambda a, b: train_generator(a, config=b["wrong_type"]),
     "model.dim: expected an integer, got 'big'"),
    ("config-wrong-type-set", lambda a, b: train_tokenizer(a, b, "--set", "model.channel_mult=big"),
     "model.channel_mult: expected a list, got 'big'"),
    ("config-impossible-resolution", lambda a, b: train_tokenizer(a, b, config=b["impossible"]),
     "model.resolution 30 is not divisible by the downsampling factor 4 (= 2 ** (len(channel_mult) - 1))"),
    ("config-not-yaml", lambda a, b: train_tokenizer(a, b, config=b["broken_yaml"]),
     "broken.yaml is not valid YAML: expected ',' or ']', but got ':' (line 2, column 6)"),
    ("config-file-missing", lambda a, b: train_tokenizer(a, b, config=b["missing"]), "config file not found: "),
    # model dirs
    ("generator-dir-missing", lambda a, b: generate(a, "--classes", "0", generator=b["missing"]),
     "generator directory not found: "),
    ("tokenizer-dir-missing", lambda a, b: reconstruct(a, a["image"], tokenizer=b["missing"]),
     "tokenizer directory not found: "),
    ("generator-dir-without-config", lambda a, b: generate(a, "--classes", "0",
                                                           generator=b["generator_without_config.json"]),
     "generator-without-config.json has no config.json"),
    ("generator-dir-without-weights", lambda a, b: generate(a, "--classes", "0",
                                                            generator=b["generator_without_model.safetensors"]),
     "has no model.safetensors"),
    ("tokenizer-dir-without-config", lambda a, b: reconstruct(a, a["image"], b["tokenizer_without_config.json"]),
     "has no config.json"),
    ("tokenizer-dir-without-weights", lambda a, b: reconstruct(a, a["image"],
                                                               b["tokenizer_without_model.safetensors"]),
     "has no model.safetensors"),
    ("generator-weights-corrupt", lambda a, b: generate(a, "--classes", "0", generator=b["generator_corrupt_weights"]),
     "model.safetensors is not a valid safetensors file: "),
    ("tokenizer-weights-corrupt", lambda a, b: reconstruct(a, a["image"], b["tokenizer_corrupt_weights"]),
     "model.safetensors is not a valid safetensors file: "),
    ("generator-config-wrong-type", lambda a, b: generate(a, "--classes", "0",
                                                          generator=b["generator_config_wrong_type"]),
     "gen-dim-big/config.json is not a valid generator config: config.dim: expected an integer, got 'big'"),
    ("generator-weights-of-another-shape", lambda a, b: generate(a, "--classes", "0",
                                                                 generator=b["generator_other_shape"]),
     "gen-dim-64/model.safetensors does not match the model described by its config.json: size mismatch for "),
    ("tokenizer-weights-of-another-shape", lambda a, b: reconstruct(a, a["image"], b["tokenizer_other_weights"]),
     "tok-other-weights/config.json: size mismatch for "),
    ("generator-meta-class-names-not-a-list", lambda a, b: generate(a, "--classes", "0",
                                                                    generator=b["generator_bad_meta"]),
     "meta.json: class_names must be a list of 3 strings, got 3"),
    # sampling arguments
    ("num-steps-0", lambda a, b: generate(a, "--classes", "0", "--num-steps", "0"), "num_steps must be >= 1, got 0"),
    ("cfg-scale-negative", lambda a, b: generate(a, "--classes", "0", "--cfg-scale", "-1"),
     "cfg_scale must be >= 0 and finite (1 = no guidance), got -1.0"),
    ("cfg-scale-nan", lambda a, b: generate(a, "--classes", "0", "--cfg-scale", "nan"),
     "cfg_scale must be >= 0 and finite (1 = no guidance), got nan"),
    ("temperature-inf", lambda a, b: generate(a, "--classes", "0", "--temperature", "inf"),
     "temperature must be >= 0 and finite, got inf"),
    ("num-per-class-0", lambda a, b: generate(a, "--classes", "0", "--num-per-class", "0"),
     "--num-per-class must be >= 1, got 0"),
    ("inpaint-num-steps-0", lambda a, b: inpaint(a, *BOX, "--num-steps", "0"), "num_steps must be >= 1, got 0"),
    ("inpaint-cfg-scale-negative", lambda a, b: inpaint(a, *BOX, "--cfg-scale", "-0.5"), "cfg_scale must be >= 0"),
    ("inpaint-num-samples-0", lambda a, b: inpaint(a, *BOX, "--num-samples", "0"), "--num-samples must be >= 1, got 0"),
    ("seed-too-large", lambda a, b: generate(a, "--classes", "0", "--seed", str(2**64)),
     "seed must be an integer in [-2**63, 2**64), got 18446744073709551616"),
    ("option-of-the-wrong-type", lambda a, b: generate(a, "--classes", "0", "--option", "choice_temperature=hot"),
     "option 'choice_temperature': expected a number, got 'hot'"),
    ("option-unknown", lambda a, b: generate(a, "--classes", "0", "--option", "bogus=1"),
     "unknown option 'bogus' for the masked generator; valid options: cfg_schedule, choice_temperature, compile, sampler"),
    # devices and outputs
    ("device-unknown", lambda a, b: generate(a, "--classes", "0", "--device", "gpu"),
     "unknown device 'gpu'; e.g. cpu, cuda, cuda:1"),
    ("device-not-on-this-machine", lambda a, b: reconstruct(a, a["image"]) + ["--device", "cuda:99"],
     "device 'cuda:99' is not available: this machine has "),
    ("output-without-an-image-extension", lambda a, b: generate(a, "--classes", "0", "--out", b["dir"] / "grid"),
     "cannot write an image to {bad}/grid: unknown image extension '' (use .png, .jpg, .webp ...)"),
    ("output-is-a-directory", lambda a, b: inpaint(a, *BOX, out=b["dir"]),
     "folder.png is a directory; give an image file name such as "),
    ("no-output", lambda a, b: without_out(a, generate(a, "--classes", "0")),
     "give --out PNG (the grid) and/or --out-dir DIR (one PNG per sample)"),
    ("inpaint-no-output", lambda a, b: without_out(a, inpaint(a, *BOX)),
     "give --out PNG (one sample, or the grid of several) and/or --out-dir DIR (one PNG per sample)"),
    ("out-dir-is-a-file", lambda a, b: generate(a, "--classes", "0", "--out-dir", a["image"]),
     "--out-dir {image} is a file, not a directory"),
    ("inpaint-out-dir-is-a-file", lambda a, b: inpaint(a, *BOX, "--out-dir", a["image"]),
     "--out-dir {image} is a file, not a directory"),
    ("reconstruct-output-unknown-extension", lambda a, b: reconstruct(a, a["image"], out=b["dir"] / "x.pnj"),
     "unknown image extension '.pnj'"),
]


@pytest.mark.parametrize("argv, expected", [pytest.param(argv, expected, id=name) for name, argv, expected in CASES])
def test_one_clear_line_and_a_traceback_with_debug(capsys, art, bad, argv, expected):
    argv = argv(art, bad)
    expected = expected.format(other=art["other"].fingerprint(), vq=art["vq"].fingerprint(), bad=bad["dir"],
                               image=art["image"])
    line = one_error_line(capsys, argv)
    assert expected in line
    assert not (art["root"] / "never-written.png").exists() and not (art["root"] / "never-trained" /
                                                                     "model.safetensors").exists()
    with pytest.raises((ValueError, OSError)) as e:             # --debug: the exception itself, with its traceback
        cli.main(["--debug", *map(str, argv)])
    assert expected in " ".join(str(e.value).split())


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads a chmod 000 file anyway")
def test_unreadable_image(capsys, art, tmp_path):
    path = tmp_path / "locked.png"
    path.write_bytes(art["image"].read_bytes())
    path.chmod(0)
    try:
        assert "locked.png cannot be read: permission denied" in one_error_line(capsys, inpaint(art, *BOX, image=path))
    finally:
        path.chmod(0o644)


def test_unreadable_image_message(capsys, monkeypatch, art):
    """As root a chmod 000 file is readable: make PIL's open fail the way it does for other users."""
    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(Image, "open", denied)
    line = one_error_line(capsys, inpaint(art, *BOX))
    assert line == f"error: {art['image']} cannot be read: permission denied"


def image_of_mode(mode: str) -> tuple[Image.Image, str]:
    """A 24x20 (not square, not 16 px) image of ``mode`` and the format to save it in."""
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 24, 3), dtype=np.uint8))
    if mode == "I;16":
        return Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)), "PNG"
    image = rgb.convert(mode)
    if mode == "RGBA":
        image.putalpha(Image.fromarray(np.tile(np.arange(24, dtype=np.uint8) * 10, (20, 1))))
    return image, "JPEG" if mode == "CMYK" else "PNG"


@pytest.mark.parametrize("mode", ["I;16", "L", "LA", "1", "CMYK", "P", "RGBA"])
def test_any_image_mode_works(capsys, art, tmp_path, mode):
    """16-bit, greyscale, CMYK (JPEG), palette and RGBA images are converted, not refused."""
    image, fmt = image_of_mode(mode)
    path = tmp_path / f"in.{fmt.lower()}"
    image.save(path, fmt)
    with Image.open(path) as saved:
        assert saved.mode == mode
    code, out, err = run_cli(capsys, reconstruct(art, path, out=tmp_path / "rec.png"))
    assert code == 0 and "PSNR" in out, err
    assert Image.open(tmp_path / "rec.png").size == (32, 16)                 # input | reconstruction
    code, out, err = run_cli(capsys, inpaint(art, "--box", "2", "2", "12", "10", image=path,
                                             out=tmp_path / "inpainted.png"))
    assert code == 0 and "wrote" in out, err
    with Image.open(tmp_path / "inpainted.png") as result:
        assert result.size == (16, 16) and result.mode == "RGB"
