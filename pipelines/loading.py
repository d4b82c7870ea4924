"""Loading trained models for every pipeline, and the checks that a tokenizer and a generator fit.

A generator directory is what ``tessera train-generator`` writes: ``config.json`` +
``model.safetensors`` (``Generator.save``) and ``meta.json``::

    {"tokenizer_hash": "...", "class_names": [...], "tessera_version": "...",
     "tokens": {"codebook_size": V, "grid_size": g, "scales": [...], "path": "...", ...}}

``meta.json`` records which tokenizer made the generator's training tokens; a generator is only
ever paired with that tokenizer (same hash, codebook size, grid and, for VAR, scales).
"""
from __future__ import annotations

import json
import logging
import numbers
import re
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch

from generator.base import Generator, load_generator
from generator.config import GeneratorConfig
from pipelines.config import ConfigError, from_dict

logger = logging.getLogger(__name__)

META = "meta.json"


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else cuda when available, else cpu. ValueError for a device string torch
    does not know, or a CUDA device this machine does not have."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device '{device}'; e.g. cpu, cuda, cuda:1") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device '{device}' is not available: this machine has {torch.cuda.device_count()} "
                         "CUDA device(s)")
    return device


def _require_model_dir(directory: str | Path, what: str, config_cls: type) -> tuple[Path, Any]:
    """``directory`` with both files, and a config.json whose keys, types and values ``config_cls``
    accepts (pipelines/config.py rules), so a hand-edited or corrupt file is one error naming the key.
    Returns the directory and that config."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{what} directory not found: {directory}")
    for name in ("config.json", "model.safetensors"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{what} directory {directory} has no {name} ({directory / name})")
    path = directory / "config.json"
    try:
        data = json.loads(path.read_text())
    except ValueError as e:                                 # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    try:
        config = from_dict(config_cls, data, "config")
    except ConfigError as e:
        raise ValueError(f"{path} is not a valid {what} config: {e}") from None
    return directory, config


def load_tokenizer(directory: str | Path, device: str | torch.device | None = None) -> torch.nn.Module:
    """A trained VQGAN from ``directory``, frozen (eval, no grads) on ``device`` (default: pick_device)."""
    from tokenizer.vqgan import VQGAN, VQGANConfig   # imported late so a generator-only use stays light

    directory, _ = _require_model_dir(directory, "tokenizer", VQGANConfig)
    tokenizer = VQGAN.from_pretrained(directory)
    tokenizer = tokenizer.to(pick_device(device)).eval().requires_grad_(False)
    return tokenizer


class GeneratorDir(NamedTuple):
    model: Generator        # frozen, eval, on the device
    meta: dict[str, Any]    # meta.json ({} when the dir has none)
    path: Path


def read_meta(directory: str | Path) -> dict[str, Any]:
    """``meta.json`` of a generator dir; {} (with a warning) when it has none."""
    path = Path(directory) / META
    if not path.is_file():
        logger.warning("%s has no %s: cannot check which tokenizer it was trained on", directory, META)
        return {}
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return meta


def read_generator_config(directory: str | Path) -> GeneratorConfig:
    """A generator directory's config, checked as ``load_generator_dir`` checks it (one clear error naming the
    problem), without loading the weights."""
    return _require_model_dir(directory, "generator", GeneratorConfig)[1]


def load_generator_dir(directory: str | Path, device: str | torch.device | None = None) -> GeneratorDir:
    """A trained generator (any family) + its meta.json, frozen on ``device`` (default: pick_device)."""
    directory, _ = _require_model_dir(directory, "generator", GeneratorConfig)
    meta = read_meta(directory)
    model = load_generator(directory, pick_device(device)).eval().requires_grad_(False)
    return GeneratorDir(model, meta, directory)


def is_multiscale(tokenizer) -> bool:
    return getattr(tokenizer.config, "quantizer", "vq") == "multiscale"


def tokenizer_hash(tokenizer) -> str:
    return str(tokenizer.fingerprint())


def describe_tokens(codebook_size: int, grid_size: int, scales: Sequence[int] = ()) -> str:
    text = f"codebook {codebook_size}, grid {grid_size}"
    return text + (f", scales {list(scales)}" if scales else "")


def check_compatible(tokenizer, generator: Generator, generator_meta: dict[str, Any] | None = None,
                     generator_dir: str | Path | None = None, tokenizer_dir: str | Path | None = None) -> None:
    """ValueError unless ``generator`` was trained on tokens of ``tokenizer``.

    Checks codebook size, grid size, scales (VAR: must equal the tokenizer's; masked/AR need a
    single-scale tokenizer), VAR's codec_dim, and the tokenizer hash recorded in meta.json.
    """
    cfg, meta = generator.config, generator_meta or {}
    gen_name = f"generator {generator_dir}" if generator_dir is not None else f"the {cfg.kind} generator"
    tok_name = str(tokenizer_dir) if tokenizer_dir is not None else "the tokenizer"
    tok_scales = tuple(tokenizer.scales) if is_multiscale(tokenizer) else ()
    gen_scales = tuple(cfg.scales) if cfg.kind == "var" else ()
    tok_hash, gen_hash = tokenizer_hash(tokenizer), meta.get("tokenizer_hash")

    problems = []
    if cfg.codebook_size != tokenizer.codebook_size:
        problems.append("codebook sizes differ")
    if cfg.grid_size != tokenizer.grid_size:
        problems.append("grid sizes differ")
    if cfg.kind == "var":
        if not tok_scales:
            problems.append("a var generator needs a multiscale tokenizer")
        elif gen_scales != tok_scales:
            problems.append("scales differ")
        elif cfg.codec_dim != tokenizer.codebook_dim:
            problems.append(f"codec_dim {cfg.codec_dim} != the tokenizer's codebook_dim {tokenizer.codebook_dim}")
    elif tok_scales:
        problems.append(f"a {cfg.kind} generator needs a single-scale (vq) tokenizer, not a multiscale one")
    if gen_hash is not None and gen_hash != tok_hash:
        problems.append("tokenizer hashes differ")
    if problems:
        raise ValueError(
            f"{gen_name} was trained on tokenizer {gen_hash or '(unknown hash)'} "
            f"({describe_tokens(cfg.codebook_size, cfg.grid_size, gen_scales)}), but {tok_name} is {tok_hash} "
            f"({describe_tokens(tokenizer.codebook_size, tokenizer.grid_size, tok_scales)}): {'; '.join(problems)}")
    if gen_hash is None:
        logger.warning("%s records no tokenizer hash; only codebook size and grid were checked", gen_name)


def class_names_for(generator: Generator, meta: dict[str, Any] | None) -> list[str]:
    """The class names in meta.json, or "class 0".. when it has none."""
    names = (meta or {}).get("class_names")
    n = generator.config.num_classes
    if not names:
        return [f"class {i}" for i in range(n)]
    if not isinstance(names, (list, tuple)) or not all(isinstance(x, str) for x in names):
        raise ValueError(f"meta.json: class_names must be a list of {n} strings, got {names!r:.80}")
    if len(names) != n:
        raise ValueError(f"meta.json lists {len(names)} class names but the generator has {n} classes")
    return [str(x) for x in names]


def _listing(class_names: Sequence[str]) -> str:
    return ", ".join(f"{i} {name}" for i, name in enumerate(class_names))


_INT = re.compile(r"[+-]?[0-9]+")                                      # ASCII digits only: int("²") fails
_DECIMAL = re.compile(r"[+-]?([0-9]*\.[0-9]+|[0-9]+\.[0-9]*|[0-9]+)([eE][+-]?[0-9]+)?")


def resolve_classes(classes: Sequence[str | int], class_names: Sequence[str]) -> list[int]:
    """Class ids or names (case-insensitive, exact) -> ids; ValueError names a bad one and lists the valid ones."""
    if not classes:
        raise ValueError(f"no classes given; valid classes: {_listing(class_names)}")
    lookup = {name.casefold(): i for i, name in enumerate(class_names)}
    out = []
    for c in classes:
        if isinstance(c, bool):
            raise ValueError(f"class {c!r} is neither an id nor a name")
        if isinstance(c, numbers.Integral):                # numpy / torch integer scalars too
            c = int(c)
        elif isinstance(c, str) and _INT.fullmatch(c.strip()):
            as_id, as_name = int(c.strip()), lookup.get(c.strip().casefold())
            if as_name is not None and as_name != as_id:        # folders named 1..12 sort as 1, 10, 11, 12, 2...
                if 0 <= as_id < len(class_names):
                    raise ValueError(f"'{c.strip()}' is ambiguous: class id {as_id} is '{class_names[as_id]}', "
                                     f"class '{c.strip()}' has id {as_name}; give {as_name} for that class")
                as_id = as_name                                 # not an id here: the name
            c = as_id
        if isinstance(c, int):
            if not 0 <= c < len(class_names):
                raise ValueError(f"class id {c} is out of range: the model has {len(class_names)} classes "
                                 f"({_listing(class_names)})")
            out.append(c)
        elif isinstance(c, str):
            if c.strip().casefold() not in lookup:
                if _DECIMAL.fullmatch(c.strip()):
                    raise ValueError(f"class id '{c}' is not an integer; valid classes: {_listing(class_names)}")
                raise ValueError(f"unknown class name '{c}'; valid classes: {_listing(class_names)}")
            out.append(lookup[c.strip().casefold()])
        else:
            raise ValueError(f"class {c!r} is neither an id nor a name")
    return out


def write_meta(directory: str | Path, tokenizer_hash: str, class_names: Sequence[str], tokens: dict[str, Any]) -> None:
    """Write a generator dir's meta.json (atomically)."""
    from pipelines.checkpoint import atomic_write_text, tessera_version

    meta = {"tokenizer_hash": tokenizer_hash, "class_names": list(class_names),
            "tessera_version": tessera_version(), "tokens": tokens}
    atomic_write_text(Path(directory) / META, json.dumps(meta, indent=1) + "\n")
