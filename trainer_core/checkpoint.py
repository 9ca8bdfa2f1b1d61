"""Checkpoints: atomic folders under <output_dir>/checkpoints/, verified by a manifest, loaded without pickle.

    checkpoints/step-00000120/
        model.safetensors       unwrapped model state dict (tied weights stored once)
        optimizer.pt            optimizer state dict   (torch.load(weights_only=True))
        scheduler.pt            scheduler state dict   (torch.load(weights_only=True))
        scaler.pt               fp16 grad scaler, when there is one
        rng_state_<rank>.json   python / numpy / torch / cuda RNG of each rank
        (FSDP: model_shard_<rank> / optimizer_shard_<rank>.safetensors instead of model + optimizer;
         DeepSpeed: its *_model_states.pt / zero_pp_rank_<rank>_*_optim_states.pt instead of optimizer.pt)
        trainer_state.json      TrainerState: step (= data cursor), epoch, best metric, callback states
        manifest.json           sha256 + size of every file, config_hash and the components it hashes
                                (model, task, num_labels, data fingerprint...), mlflow_run_id, global_step

Everything is written into `.tmp-step-00000120/`, fsynced, then renamed; the manifest is written last, so a
folder with a manifest that verifies is complete. `find_resumable` takes the newest such folder.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trainer_core.files import fsync_dir, fsync_file, replace_dir, sha256_file

if TYPE_CHECKING:  # torch is imported where tensors are touched: a cached flow run reads manifests only
    import torch

logger = logging.getLogger("trainer_core.checkpoint")

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
_SAFE_FILES = re.compile(
    r"^(model\.safetensors|optimizer\.pt|scheduler\.pt|scaler\.pt|trainer_state\.json|rng_state_\d+\.json|manifest\.json"
    r"|model_shard_\d+\.safetensors|optimizer_shard_\d+\.safetensors"  # FSDP2 shards: trainer_core.fsdp2
    # DeepSpeed ZeRO partitions, read with torch.load(weights_only=True): trainer_core.zero
    r"|(?:(?:bf16_)?zero_pp_rank_\d+_)?mp_rank_\d+_(?:model|optim)_states\.pt)$"
)
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Committed checkpoint folders (verified or not), oldest first; temp folders are ignored."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)), key=lambda p: p.name)


# --- atomic folders ----------------------------------------------------------------------------
def begin(output_dir: str | Path, step: int) -> Path:
    """Fresh temp folder for step's checkpoint (main process only); a leftover from a killed save is wiped."""
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, *, config_hash: str, mlflow_run_id: str | None, global_step: int,
           config_components: dict[str, Any] | None = None) -> Path:
    """fsync every file, write the manifest last, rename into place, fsync the parent (main process only)."""
    files = {}
    for path in sorted(tmp.iterdir()):
        fsync_file(path)
        files[path.name] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    manifest = {
        "format": 1,
        "global_step": global_step,
        "config_hash": config_hash,
        "config_components": dict(config_components or {}),
        "mlflow_run_id": mlflow_run_id,
        "files": files,
    }
    manifest_path = tmp / MANIFEST
    with open(manifest_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    # a re-save of the same step (e.g. after a resume at it) replaces the folder whole
    return replace_dir(tmp, tmp.with_name(tmp.name.removeprefix(".tmp-")))


# --- verification ------------------------------------------------------------------------------
def verify(path: str | Path) -> str | None:
    """Why this checkpoint cannot be used, or None when its manifest verifies."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "missing manifest (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError) as err:
        return f"unreadable manifest ({err})"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"missing file {name}"
        size = file.stat().st_size
        if size != expected["size"]:
            return f"truncated file {name} ({size} bytes, manifest says {expected['size']})"
        if sha256_file(file) != expected["sha256"]:
            return f"hash mismatch in {name}"
    return None


def find_resumable(output_dir: str | Path) -> Path | None:
    """Newest checkpoint whose manifest verifies; logs which one and why newer ones were skipped."""
    for path in reversed(list_checkpoints(output_dir)):
        reason = verify(path)
        if reason is None:
            logger.info("Resumable checkpoint: %s", path)
            return path
        logger.warning("Skipping checkpoint %s: %s", path, reason)
    return None


def unsafe_files(path: str | Path) -> list[str]:
    """Files of a checkpoint folder outside the safe list (e.g. pickles, which can run code when loaded)."""
    return sorted(p.name for p in Path(path).iterdir() if not _SAFE_FILES.match(p.name))


def read_manifest(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))


def describe_difference(found: dict[str, Any], expected: dict[str, Any]) -> str:
    """`model: 'a' in the checkpoint, 'b' in this run; ...` over the components recorded on both sides."""
    if not found or not expected:
        return "(the checkpoint records no config components: compare the two configs' model, task and data)"
    keys = sorted(set(found) | set(expected))
    diff = [f"{k}: {found.get(k, '<not recorded>')!r} in the checkpoint, {expected.get(k, '<not recorded>')!r} in "
            f"this run" for k in keys if found.get(k) != expected.get(k)]
    return "; ".join(diff) or "(no recorded component differs: the difference is in a part of the config not recorded)"


def check_loadable(path: str | Path, config_hash: str, config_components: dict[str, Any] | None = None) -> dict[str, Any]:
    """Raise ValueError unless `path` verifies, holds only known safe files and comes from this config."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"Refusing checkpoint {path}: no such folder.")
    unsafe = unsafe_files(path)
    if unsafe:
        raise ValueError(
            f"Refusing checkpoint {path}: it holds files outside the safe list ({', '.join(unsafe)}); "
            "pickled files (*.bin, *.pkl) can run code when loaded. Remove them or use another checkpoint."
        )
    reason = verify(path)
    if reason is not None:
        raise ValueError(f"Refusing checkpoint {path}: {reason}.")
    manifest = read_manifest(path)
    if manifest["config_hash"] != config_hash:
        differs = describe_difference(manifest.get("config_components") or {}, config_components or {})
        raise ValueError(
            f"Refusing checkpoint {path}: it was written by config {manifest['config_hash']!r} but this run has "
            f"config {config_hash!r}. What differs: {differs}. Resume with the same model, task and data, start a "
            "new run (another output_dir), or set trainer.warm_start=true to load only the weights."
        )
    return manifest


_PICKLE_SUFFIXES = (".bin", ".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".joblib", ".npy", ".npz")


def load_warm_start(model: torch.nn.Module, path: str | Path) -> tuple[list[str], list[str]]:
    """Load only the weights of `path` (a checkpoint or a final/ folder) into `model`: tensors whose name and
    shape match; returns (loaded, skipped) names. Refuses a folder holding pickle files it does not know."""
    path = Path(path)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise ValueError(f"Refusing warm start from {path}: no model.safetensors in it.")
    suspicious = [name for name in unsafe_files(path) if name.endswith(_PICKLE_SUFFIXES)]
    if suspicious:
        raise ValueError(
            f"Refusing warm start from {path}: it holds pickled files ({', '.join(suspicious)}) that can run code "
            "when loaded. Remove them or use another checkpoint."
        )
    if (path / MANIFEST).is_file() and (reason := verify(path)) is not None:
        raise ValueError(f"Refusing warm start from {path}: {reason}.")
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(weights))
    with safe_open(str(weights), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for name, source in aliases.items():
        tensors[name] = tensors[source]
    own = model.state_dict()
    usable = {k: v for k, v in tensors.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    skipped = sorted(set(own) - set(usable))
    model.load_state_dict(usable, strict=False)
    return sorted(usable), skipped


# --- model weights -----------------------------------------------------------------------------
def save_weights(state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """safetensors refuses tensors sharing memory: store each storage once, the aliases in the metadata."""
    from safetensors.torch import save_file

    seen: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().cpu().contiguous()
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for name, source in aliases.items():
        tensors[name] = tensors[source]
    model.load_state_dict(tensors, strict=True)


# --- RNG -----------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from, as JSON-friendly lists (no pickle needed to load it back)."""
    import torch

    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_kind, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def tree_size(path: str | Path) -> int:
    """Bytes of the files under `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, sort_keys=True), encoding="utf-8")


# --- rotation ----------------------------------------------------------------------------------
def rotate(output_dir: str | Path, save_total_limit: int | None, best: str | None,
           delete: Callable[[Path], None] = shutil.rmtree) -> list[Path]:
    """Delete the oldest checkpoints beyond save_total_limit, never the best one (transformers' rule:
    the best is moved next to the newest; with limit 1 and a best that is not the newest, two are kept).
    Called only after the newest checkpoint committed, so a crash never leaves nothing to resume from."""
    if not save_total_limit:
        return []
    checkpoints = [str(p) for p in list_checkpoints(output_dir)]
    limit = save_total_limit
    if best is not None and str(Path(best)) in checkpoints:
        index = checkpoints.index(str(Path(best)))
        for i in range(index, len(checkpoints) - 2):
            checkpoints[i], checkpoints[i + 1] = checkpoints[i + 1], checkpoints[i]
        if limit == 1 and checkpoints[-1] != str(Path(best)):
            limit = 2
    doomed = [Path(p) for p in checkpoints[: max(0, len(checkpoints) - limit)]]
    for path in doomed:
        logger.info("Deleting checkpoint %s (save_total_limit=%d)", path, save_total_limit)
        delete(path)
    return doomed
