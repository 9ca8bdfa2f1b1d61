"""Which precisions this machine can train in: the one place the trainer and the preflight ask.

    from trainer_core.precision import precision_problem
    precision_problem("bf16")   # None, or what is wrong and what to use instead
"""

from __future__ import annotations

PRECISIONS = ("no", "fp16", "bf16")


def bf16_supported() -> bool:
    """bf16 on GPU needs Ampere or newer; on CPU torch autocasts to bf16 (slow on old CPUs, but correct)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return True


def fp16_supported() -> bool:
    import torch

    return torch.cuda.is_available()


def precision_problem(mixed_precision: str, key: str = "trainer.mixed_precision") -> str | None:
    """Why `mixed_precision` cannot run here (naming `key` and the fix), or None when it can."""
    if mixed_precision not in PRECISIONS:
        return f"{key}={mixed_precision!r}: use one of {', '.join(PRECISIONS)}."
    if mixed_precision == "bf16" and not bf16_supported():
        return (f"{key}=bf16: bf16 precision was requested but not available on this hardware. "
                "Please use fp16 or no (fp32) instead.")
    if mixed_precision == "fp16" and not fp16_supported():
        return f"{key}=fp16: needs a CUDA GPU. Please use bf16 or no (fp32) on CPU."
    return None
