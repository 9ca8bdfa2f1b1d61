"""Bad peft input: exit code 2 before training, one message naming the key and the fix, nothing written.

    .venv/bin/python -m pytest tests/pipeline/test_peft_bad_input.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flows.finetune import main

pytestmark = pytest.mark.usefixtures("restore_environ")


def _fails(capsys, root: Path, overrides: list[str], *fragments: str) -> str:
    code = main([*overrides, f"paths.root={root}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    assert not (root / "mlflow.db").exists() and not (root / "stages").exists()
    return err


@pytest.mark.parametrize(
    "overrides,fragments",
    [
        # the modules LoRA could adapt are listed, from the model's own structure (checked without its weights)
        (["model=tiny_bert", "peft=lora", "peft.target_modules=[q_proj,value]"],
         ["peft.target_modules: q_proj match(es) no module", "query", "dense"]),
        (["peft=lora", "peft.target_modules=[q_proj]"], ["peft.target_modules: q_proj", "key, position_embeddings"]),
        (["model=tiny_bert", "peft=lora", "peft.r=0"], ["peft.r=0: the LoRA rank must be > 0"]),
        (["model=tiny_bert", "peft=lora", "peft.lora_dropout=1.5"], ["peft.lora_dropout=1.5: must be within [0, 1)"]),
        (["model=tiny_bert", "peft=lora", "registry.merge_adapter=false"],
         ["registry.merge_adapter=false: model=tiny_bert is a random init"]),
    ],
)
def test_peft_config_errors(capsys, tmp_path: Path, overrides: list[str], fragments: list[str]) -> None:
    _fails(capsys, tmp_path, overrides, *fragments)


@pytest.mark.parametrize("hardware", ["fsdp_2gpu", "deepspeed_zero2", "deepspeed_zero3"])
def test_peft_with_sharded_hardware_is_accepted(hardware: str) -> None:
    """LoRA trains under FSDP2 and ZeRO-2/3 too (tests/distributed/test_peft_distributed.py)."""
    from flows.config import compose
    from stages.schema import validate

    validate(compose(["model=tiny_bert", "peft=lora", f"hardware={hardware}"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_qlora_without_cuda_is_refused_by_name(capsys, tmp_path: Path) -> None:
    err = _fails(capsys, tmp_path, ["model=tiny_bert", "peft=qlora"], "peft=qlora", "needs a CUDA GPU and bitsandbytes")
    assert len(err.strip().splitlines()) == 1  # one line
