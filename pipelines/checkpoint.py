"""Training checkpoints and model dirs: atomic, self-verifying, no pickle of arbitrary objects.

A checkpoint is a directory ``RUN/checkpoints/step-0000100/`` holding

- ``<name>.safetensors``   one per tensor group (module state dicts, EMA weights, RNG states),
- ``optimizer-<name>.pt``  optimizer state dicts (tensors / numbers / lists only), read back with
  ``torch.load(weights_only=True)`` so a crafted pickle is refused, never executed,
- ``trainer_state.json``   step, epoch, position in the epoch, non-finite count, ...,
- ``manifest.json``        SHA-256 and size of every file above, tessera version, config hash.

It is written into ``step-0000100.tmp/`` and renamed into place only once every file is on disk
(fsync'd), so a crash leaves either a whole checkpoint or a ``.tmp`` dir that is ignored.
A model dir (``config.json`` + ``model.safetensors``) is what users load; it is written the same way.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d{7,})$")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")   # file-safe names: no '/', no '..' tricks
_PREFIXES = ("_orig_mod.", "module.")                   # torch.compile / DDP wrappers


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, truncated, corrupt or unsafe; the message names the file."""


def tessera_version() -> str:
    try:
        from importlib.metadata import version
        return version("tessera-gen")
    except Exception:  # not installed (running from a source tree)
        return "0+unknown"


# ---------------------------------------------------------------------------- atomic writes
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems / platforms cannot open a dir; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tensor_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    # clone to CPU: safetensors refuses tensors that share storage (tied weights, views)
    flat = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    return st_save(flat, metadata=metadata)


def _check_name(name: str, what: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"{what} name {name!r} is not file-safe (letters, digits, '_', '.', '-')")


# ---------------------------------------------------------------------------- checkpoints
@dataclass
class Checkpoint:
    """A verified checkpoint read back from disk."""
    path: Path
    step: int
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    optimizer_states: dict[str, dict] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def save_checkpoint(run_dir: str | Path, step: int, tensors: dict[str, dict[str, torch.Tensor]],
                    optimizer_states: dict[str, dict], state: dict[str, Any], keep_last: int = 3,
                    config_hash: str | None = None) -> Path:
    """Write ``RUN/checkpoints/step-XXXXXXX/`` atomically and prune to the newest ``keep_last``.

    tensors: group name -> flat ``{key: Tensor}`` (a module state dict, EMA weights, RNG states);
    optimizer_states: name -> ``optimizer.state_dict()``; state: JSON-able trainer state.
    Returns the checkpoint's path.
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / (final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files: dict[str, dict[str, Any]] = {}

    def put(fname: str, data: bytes, kind: str, name: str | None = None) -> None:
        with open(tmp / fname, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        entry = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "kind": kind}
        if name is not None:
            entry["name"] = name
        files[fname] = entry

    for name, group in tensors.items():
        _check_name(name, "tensor group")
        put(f"{name}.safetensors", _tensor_bytes(group), "tensors", name)
    for name, opt_state in optimizer_states.items():
        _check_name(name, "optimizer")
        buf = io.BytesIO()
        torch.save(opt_state, buf)
        put(f"optimizer-{name}.pt", buf.getvalue(), "optimizer", name)
    state = dict(state, step=step)
    put(STATE_FILE, json.dumps(state, indent=1, sort_keys=True).encode(), "state")
    manifest = {"format": 1, "step": step, "tessera_version": tessera_version(),
                "config_hash": config_hash, "files": files}
    with open(tmp / MANIFEST, "wb") as f:  # the manifest covers every file but itself
        f.write(json.dumps(manifest, indent=1, sort_keys=True).encode())
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)

    if final.exists():  # same step written again (e.g. a resumed run ending where it started)
        old = root / (final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    _prune(root, keep_last, step)
    logger.info("checkpoint written: %s", final)
    return final


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Finished checkpoint dirs of a run, newest first (``.tmp`` dirs are unfinished and ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def _prune(root: Path, keep_last: int, written_step: int) -> None:
    """Remove unfinished writes and all but the ``keep_last`` newest checkpoints up to the one just
    written (kept). Newer ones (damaged checkpoints a resume skipped) are left for the user to inspect:
    counting them would prune the new checkpoints."""
    for p in root.iterdir():  # leftovers of interrupted writes
        if p.is_dir() and (p.name.endswith(".tmp") or p.name.endswith(".old")):
            shutil.rmtree(p, ignore_errors=True)
    if keep_last > 0:
        older = [p for step, p in list_checkpoints(root.parent) if step < written_step]
        for p in older[keep_last - 1:]:
            shutil.rmtree(p, ignore_errors=True)


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check every file against the manifest; return the manifest or raise CheckpointError."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{mpath} is missing: {path} is not a finished checkpoint")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        int(manifest["step"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{mpath} is corrupt: {e}") from None
    if not isinstance(files, dict):
        raise CheckpointError(f"{mpath} is corrupt: 'files' is not a mapping")
    for fname, entry in files.items():
        if not _NAME.match(fname):
            raise CheckpointError(f"{mpath} names an unsafe file {fname!r}")
        fpath = path / fname
        if not fpath.is_file():
            raise CheckpointError(f"{fpath} is missing")
        size = fpath.stat().st_size
        if size != entry.get("size"):
            raise CheckpointError(f"{fpath} is truncated or altered: {size} bytes, manifest says {entry.get('size')}")
        if _sha256(fpath) != entry.get("sha256"):
            raise CheckpointError(f"{fpath} is corrupt: its SHA-256 does not match the manifest")
    return manifest


def _load_optimizer_state(fpath: Path) -> dict:
    try:
        # weights_only: the unpickler accepts tensors, numbers, strings, lists, dicts - never a
        # callable - so a crafted file fails here instead of running code.
        obj = torch.load(fpath, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError, EOFError) as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # wording varies across torch versions
        why = f"it references {found.group(1)}" if found else type(e).__name__
        raise CheckpointError(f"{fpath} is not a plain optimizer state; refusing to unpickle it ({why}). "
                              "Checkpoints from untrusted sources are never loaded with full pickle.") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{fpath} does not hold an optimizer state dict")
    return obj


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint dir after verifying its manifest (CheckpointError names a bad file)."""
    path = Path(path)
    manifest = verify_checkpoint(path)
    ckpt = Checkpoint(path=path, step=int(manifest["step"]), manifest=manifest)
    for fname, entry in manifest["files"].items():
        fpath = path / fname
        kind, name = entry.get("kind"), entry.get("name")
        if kind == "tensors":
            try:
                ckpt.tensors[name] = st_load(fpath.read_bytes())
            except (SafetensorError, ValueError) as e:
                raise CheckpointError(f"{fpath} is not a valid safetensors file: {e}") from None
        elif kind == "optimizer":
            ckpt.optimizer_states[name] = _load_optimizer_state(fpath)
        elif kind == "state":
            try:
                ckpt.state = json.loads(fpath.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{fpath} is not valid JSON: {e}") from None
        else:
            raise CheckpointError(f"{path / MANIFEST} lists {fname} with unknown kind {kind!r}")
    return ckpt


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest intact checkpoint of a run, skipping (with a warning) any that fail verification."""
    for _, path in list_checkpoints(run_dir):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            logger.warning("skipping damaged checkpoint %s: %s", path, e)
    return None


# ---------------------------------------------------------------------------- model dirs
def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ``_orig_mod.`` (torch.compile) and ``module.`` (DDP) key prefixes."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def save_model_dir(model_dir: str | Path, config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> None:
    """Write ``config.json`` + ``model.safetensors`` atomically (weights first, then config)."""
    model_dir = Path(model_dir)
    atomic_write_bytes(model_dir / "model.safetensors", _tensor_bytes(strip_prefixes(state_dict)))
    atomic_write_text(model_dir / "config.json", json.dumps(config, indent=1, sort_keys=True) + "\n")


def load_model_dir(model_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read ``config.json`` + ``model.safetensors`` -> (config dict, state dict on CPU)."""
    model_dir = Path(model_dir)
    cfg_path, w_path = model_dir / "config.json", model_dir / "model.safetensors"
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: {model_dir} is not a model dir")
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
    try:
        state_dict = st_load(w_path.read_bytes())
    except (SafetensorError, ValueError) as e:
        raise ValueError(f"{w_path} is not a valid safetensors file: {e}") from None
    return config, strip_prefixes(state_dict)
