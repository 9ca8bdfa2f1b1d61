"""Parameter-efficient fine-tuning: wrap the family's model in PEFT adapters, save and load only what trains.

    from trainer_core import adapters
    model = adapters.wrap(family.build_model(spec.model), spec.peft)   # {} (full fine-tune): the model as is
    adapters.trainable_only(model, state_dict)     # the checkpoint's tensors: adapters + modules_to_save
    adapters.save_final(model, folder)             # merged model (evaluate / predict / serve unchanged) + adapter/

`spec.peft` is the `peft` config group as a dict (stages.schema.PeftConfig.spec): PEFT's LoraConfig names plus
`method` and `load_in_4bit`. The task head (the top-level modules next to the base model, e.g. `classifier`) is
trained in full through modules_to_save, as PEFT does itself for a SEQ_CLS task type.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("trainer_core")

ADAPTER_DIR = "adapter"
"""Sub-folder of final/ holding the adapter alone (PEFT's adapter_model.safetensors + adapter_config.json)."""
LORA_KEYS = ("r", "lora_alpha", "lora_dropout", "use_rslora", "init_lora_weights", "use_dora")
ADAPTABLE = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)


def is_adapted(model: torch.nn.Module) -> bool:
    if "peft" not in sys.modules:  # nothing was wrapped: a full fine-tune never pays for importing peft
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


# --- which modules ---------------------------------------------------------------------------------
def head_modules(model: torch.nn.Module) -> list[str]:
    """The task head: top-level modules with weights of their own next to the base model (`bert`, `vit`, ...),
    e.g. `classifier`, `qa_outputs`, `decode_head`. A head tied to the embeddings (an LM head) is left out, and so
    is everything of a model without a base model child (T5, encoder-decoder): nothing there is new."""
    prefix = getattr(model, "base_model_prefix", "")
    children = dict(model.named_children())
    if prefix not in children:
        return []
    base = {id(p) for p in children[prefix].parameters()}
    return [name for name, module in children.items() if name != prefix
            and (params := list(module.parameters())) and not any(id(p) in base for p in params)]


def _adaptable_names(model: torch.nn.Module) -> list[str]:
    """Last name parts of the modules LoRA can adapt (Linear, Conv, Embedding, GPT-2's Conv1D), sorted."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if name and (isinstance(module, ADAPTABLE) or type(module).__name__ == "Conv1D")}
    return sorted(names)


def _matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith(f".{target}")  # PEFT's rule for a list of names


def target_errors(model: torch.nn.Module, peft: dict[str, Any]) -> list[str]:
    """peft.target_modules entries that match no module of `model`, each listing what exists; r and targets."""
    errors = []
    if int(peft.get("r", 0)) <= 0:
        errors.append(f"peft.r={peft.get('r')}: the LoRA rank must be > 0 (e.g. peft.r=8); for a full fine-tune "
                      "use peft=none.")
    targets = list(peft.get("target_modules") or [])
    if targets == ["all-linear"]:
        return errors
    names = [name for name, _ in model.named_modules() if name]
    missing = [t for t in targets if not any(_matches(n, t) for n in names)]
    if missing:
        errors.append(
            f"peft.target_modules: {', '.join(missing)} match(es) no module of this model; modules that LoRA "
            f"can adapt: {', '.join(_adaptable_names(model))} (or use peft.target_modules=[all-linear])."
        )
    return errors


def lora_config(model: torch.nn.Module, peft: dict[str, Any]) -> Any:
    """PEFT's LoraConfig for the `peft` group, modules_to_save = the task head + peft.modules_to_save."""
    from peft import LoraConfig

    targets = list(peft["target_modules"])
    head = head_modules(model)
    saved = list(dict.fromkeys([*head, *peft.get("modules_to_save", [])]))
    return LoraConfig(
        r=int(peft["r"]), lora_alpha=peft["lora_alpha"], lora_dropout=float(peft["lora_dropout"]),
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        # a head trained in full is not adapted as well
        exclude_modules=head or None,
        modules_to_save=saved or None, use_rslora=bool(peft["use_rslora"]),
        init_lora_weights=peft["init_lora_weights"], use_dora=bool(peft["use_dora"]),
    )


# --- wrap ------------------------------------------------------------------------------------------
def wrap(model: torch.nn.Module, peft: dict[str, Any] | None) -> torch.nn.Module:
    """`model` with LoRA adapters (base frozen) for a `peft` spec; the model itself for {} (full fine-tune).
    Raises ValueError naming the key for r <= 0, unmatched target_modules, or 4-bit without CUDA."""
    if not peft or peft.get("method", "none") == "none":
        return model
    if peft.get("load_in_4bit") and not torch.cuda.is_available():
        raise ValueError("peft=qlora (peft.load_in_4bit=true) needs a CUDA GPU and bitsandbytes: use peft=lora "
                         "on this machine.")
    errors = target_errors(model, peft)
    if errors:
        raise ValueError("Config is not well-formed, found the following errors:\n - " + "\n - ".join(errors))
    from peft import get_peft_model

    adapted = get_peft_model(model, lora_config(model, peft))
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    total = sum(p.numel() for p in adapted.parameters())
    logger.info("LoRA r=%s on %s: %d of %d parameters train (%.2f%%); saved in full: %s", peft["r"],
                ",".join(peft["target_modules"]), trainable, total, 100 * trainable / max(total, 1),
                ",".join(adapted.peft_config["default"].modules_to_save or []) or "nothing")
    return adapted


def components(peft: dict[str, Any] | None) -> dict[str, Any]:
    """The adapter's part of a checkpoint's config components: a refused resume names rank, targets, ..."""
    if not peft or peft.get("method", "none") == "none":
        return {"peft.method": "none"}
    found = {"peft.method": peft["method"], "peft.target_modules": ",".join(peft["target_modules"]),
             "peft.modules_to_save": ",".join(peft.get("modules_to_save") or []),
             "peft.load_in_4bit": bool(peft.get("load_in_4bit"))}
    found.update({f"peft.{k}": peft[k] for k in LORA_KEYS if k in peft})
    return found


# --- checkpoints -----------------------------------------------------------------------------------
def trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def trainable_only(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint of `model` holds: all of them for a full fine-tune, the trained ones (adapters and
    modules_to_save) for an adapted model; the frozen base is rebuilt from its own weights on resume."""
    if not is_adapted(model):
        return state_dict
    keep = trainable_names(model)
    return {k: v for k, v in state_dict.items() if k in keep}


def load_trainable(model: torch.nn.Module, path: str | Path) -> None:
    """Load an adapter checkpoint's tensors: every trained parameter must be in it, nothing else may be."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    expected = trainable_names(model)
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(
            f"Refusing checkpoint {Path(path).parent}: its adapter tensors do not fit this model's "
            f"(missing {', '.join(missing[:5]) or 'none'}; unexpected {', '.join(unexpected[:5]) or 'none'}). "
            "Resume with the same peft config (r, target_modules, modules_to_save), or start a new run."
        )
    model.load_state_dict(tensors, strict=False)


def load_adapter_folder(model: torch.nn.Module, folder: str | Path) -> tuple[list[str], list[str]]:
    """Warm start from a saved adapter (final/adapter/: PEFT's files) into an adapted model: the tensors whose
    name and shape match; returns (loaded, skipped) trained names."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not is_adapted(model):
        raise ValueError(f"Refusing warm start from {folder}: it is a LoRA adapter, but this run has peft=none; "
                         "use the same peft option as the run that trained it (e.g. peft=lora).")
    tensors = load_file(str(Path(folder) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, tensors)
    skipped = sorted(n for n in trainable_names(model) if n in set(result.missing_keys))
    loaded = sorted(trainable_names(model) - set(skipped))
    return loaded, skipped


# --- final model -----------------------------------------------------------------------------------
def save_final(model: torch.nn.Module, folder: Path, state_dict: dict[str, torch.Tensor] | None = None,
               **save_kwargs: Any) -> None:
    """final/ of an adapted model: the adapters merged into a copy of the base (a plain transformers model, so
    evaluate, predict, register and serving need nothing new), and final/adapter/ with the adapter alone.
    The copy keeps the trained model as it is (merging is not exactly reversible). `state_dict`: the model's full
    state dict gathered by the strategy, where the live parameters are sharded (FSDP2) or partitioned (ZeRO)."""
    source = model if state_dict is None else plain_replica(model, state_dict)
    source.save_pretrained(folder / ADAPTER_DIR)
    merged = (copy.deepcopy(source) if source is model else source).merge_and_unload()
    merged.save_pretrained(folder, **save_kwargs)
    config = json.loads((folder / ADAPTER_DIR / "adapter_config.json").read_text())
    logger.info("final/: LoRA merged into the base; adapter alone in %s (r=%s, targets %s)",
                folder / ADAPTER_DIR, config.get("r"), config.get("target_modules"))


def plain_replica(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain CPU copy of an adapted model whose own parameters are shards (FSDP2 DTensors, ZeRO-3 partitions):
    the same architecture and adapter config built on the meta device (no init, no copy of the shards), then
    given the gathered tensors. Main process only; no collective."""
    from peft import get_peft_model

    inner = model.get_base_model()
    with torch.device("meta"):
        base = type(inner)(copy.deepcopy(inner.config))
    replica = get_peft_model(base, copy.deepcopy(model.peft_config["default"]))
    # every tensor of the replica comes from the gathered state dict (strict: a missing one stays on meta)
    replica.load_state_dict({k: v.detach().cpu() for k, v in state_dict.items()}, strict=True, assign=True)
    return replica.eval()


def lineage_tags(final: str | Path, merged: bool = True) -> dict[str, str]:
    """Model-version tags saying how a final/ folder was trained: `peft.method` none, or lora with its rank,
    targets and whether the registered weights are merged or an adapter on a pinned base."""
    config_path = Path(final) / ADAPTER_DIR / "adapter_config.json"
    if not config_path.is_file():
        return {"peft.method": "none"}
    config = json.loads(config_path.read_text())
    targets = config.get("target_modules")
    return {
        "peft.method": "dora" if config.get("use_dora") else "lora",
        "peft.r": str(config.get("r")),
        "peft.lora_alpha": str(config.get("lora_alpha")),
        "peft.target_modules": targets if isinstance(targets, str) else ",".join(sorted(targets or [])),
        "peft.modules_to_save": ",".join(sorted(config.get("modules_to_save") or [])),
        "peft.registered_as": "merged" if merged else "adapter",
    }


# --- registering the adapter alone (registry.merge_adapter=false) ----------------------------------
BASE_REFERENCE = "base.json"
"""In a registered weights folder: the pinned base the adapter goes on (path or Hub id, revision, SHA-256)."""
WEIGHTS = "model.safetensors"


def pin_base(name_or_path: str, revision: str | None = None) -> dict[str, Any]:
    """Where the base weights are (a local folder or a Hub id + revision) and the SHA-256 of their file."""
    from transformers.utils import cached_file

    from trainer_core.files import sha256_file

    path = cached_file(name_or_path, WEIGHTS, revision=revision)
    return {"name_or_path": name_or_path, "revision": revision, "file": WEIGHTS, "sha256": sha256_file(path)}


def strip_to_adapter(folder: Path, base: dict[str, Any]) -> None:
    """Turn a copy of final/ into an adapter package: no merged weights, the base pinned in base.json."""
    if not (folder / ADAPTER_DIR / "adapter_model.safetensors").is_file():
        raise ValueError(f"{folder}: no {ADAPTER_DIR}/ to register (was it trained with peft=lora?)")
    (folder / WEIGHTS).unlink()
    (folder / BASE_REFERENCE).write_text(json.dumps(base, indent=2, sort_keys=True))


def is_adapter_package(folder: str | Path) -> bool:
    return (Path(folder) / BASE_REFERENCE).is_file()


@contextlib.contextmanager
def base_folder(folder: str | Path) -> Iterator[Path]:
    """A folder the family's load_for_serving reads: the package's config and tokenizer, the pinned base's weights
    (refused when their SHA-256 is not the pinned one). The head's weights come with the adapter. A temporary
    folder of links, removed when the block ends (the model has read its files by then)."""
    import shutil
    import tempfile

    from transformers.utils import cached_file

    from trainer_core.files import sha256_file

    folder = Path(folder)
    base = json.loads((folder / BASE_REFERENCE).read_text())
    weights = Path(cached_file(base["name_or_path"], base["file"], revision=base.get("revision")))
    if (found := sha256_file(weights)) != base["sha256"]:
        raise ValueError(f"Refusing the base of {folder}: {weights} has SHA-256 {found[:16]}..., the adapter was "
                         f"trained on {base['sha256'][:16]}... ({base['name_or_path']}@{base.get('revision')}).")
    out = Path(tempfile.mkdtemp(prefix="adapter-base-"))
    try:
        for item in folder.iterdir():
            if item.is_file() and item.name != BASE_REFERENCE:
                (out / item.name).symlink_to(item.resolve())
        (out / WEIGHTS).symlink_to(weights.resolve())
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)


def attach(model: torch.nn.Module, folder: str | Path) -> torch.nn.Module:
    """The serving model of an adapter package: base + adapter (+ its modules_to_save), merged, in eval mode."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(Path(folder) / ADAPTER_DIR)).merge_and_unload().eval()
