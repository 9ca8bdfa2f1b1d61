"""Which precisions this machine can train in: the one place the trainer and the preflight ask.

    from trainer_core.precision import precision_problem, resolve
    precision_problem("bf16")   # None, or what is wrong and what to use instead
    resolve("auto")             # ("bf16", "CPU avx512_bf16 runs bf16 natively") or ("no", "no native bf16 ...")
"""

from __future__ import annotations

from pathlib import Path

PRECISIONS = ("no", "fp16", "bf16")
AUTO = "auto"
"""trainer.mixed_precision=auto: bf16 where the hardware has native bf16, else fp32 (no)."""


BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""CPU instruction sets that run bf16 natively (elsewhere torch emulates bf16 slowly)."""


def cpu_flags() -> dict[str, bool]:
    """Which of BF16_FLAGS this CPU has: on Linux as the kernel reports them in /proc/cpuinfo (no torch import, so
    a cached flow run composes its config without torch), elsewhere as torch's CPU probe reports them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)
    if flags is not None:
        return {flag: flag in flags for flag in BF16_FLAGS}
    import torch

    try:
        found = dict(torch._C._cpu._get_cpu_capability())  # private: torch has no public probe of these flags
    except (AttributeError, RuntimeError, TypeError):
        return {}
    return {flag: bool(found.get(flag)) for flag in BF16_FLAGS}


def native_bf16(use_cpu: bool = True) -> str | None:
    """What gives this machine native bf16 (e.g. "CPU amx_bf16", "CUDA compute capability 9.0"), None if nothing:
    Ampere or newer on CUDA; AMX or AVX512-BF16 on the CPU."""
    if not use_cpu:
        import torch

        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability()
        return f"CUDA compute capability {major}.{minor}" if major >= 8 else None
    flags = cpu_flags()
    return next((f"CPU {flag}" for flag in BF16_FLAGS if flags.get(flag)), None)


def resolve(mixed_precision: str, use_cpu: bool = True) -> tuple[str, str]:
    """The precision to run for a requested one, and why: `auto` is bf16 where native_bf16 says so, else no."""
    if mixed_precision != AUTO:
        return mixed_precision, "asked for"
    reason = native_bf16(use_cpu)
    if reason:
        return "bf16", f"{reason} runs bf16 natively"
    return "no", f"no native bf16 on this {'CPU' if use_cpu else 'GPU'}: fp32"


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
        return f"{key}={mixed_precision!r}: use one of {', '.join((AUTO, *PRECISIONS))}."
    if mixed_precision == "bf16" and not bf16_supported():
        return (f"{key}=bf16: bf16 precision was requested but not available on this hardware. "
                "Please use fp16 or no (fp32) instead.")
    if mixed_precision == "fp16" and not fp16_supported():
        return f"{key}=fp16: needs a CUDA GPU. Please use bf16 or no (fp32) on CPU."
    return None


def full_eval_problem(bf16_full_eval: bool) -> str | None:
    """Why trainer.bf16_full_eval cannot run here (and the fix), or None when it can."""
    if bf16_full_eval and not bf16_supported():
        return ("trainer.bf16_full_eval=true: this GPU has no bf16 (it needs compute capability 8.0, Ampere, or "
                "newer): set trainer.bf16_full_eval=false.")
    return None


def bf16_weights(model):
    """`model` in bf16 for scoring (Trainer's bf16_full_eval): its weights, and the floating inputs it is given,
    since not every model casts those to its own dtype (SegFormer's pixel_values, say)."""
    import torch

    def bf16(value):
        return value.to(torch.bfloat16) if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    def cast_inputs(_module, args, kwargs):
        return tuple(bf16(a) for a in args), {k: bf16(v) for k, v in kwargs.items()}

    model = model.to(torch.bfloat16)
    model.register_forward_pre_hook(cast_inputs, with_kwargs=True)
    return model
