"""Argument checks and conversions shared by the public API (losses, modules, W, alignment, the CLI).

Every value a user passes goes through one of these before it reaches an op, so that a bad value raises
one clear error that names the argument, and a valid value of any common Python or NumPy type is
accepted: ``np.float32(2.0)`` is a temperature, ``np.int64(3)`` a count, ``[]`` an empty chunk table.
Index tables are range-checked in their own dtype before they are narrowed to the int32 the kernels
read, so a value past 2^31 is reported instead of wrapping around.
"""

from __future__ import annotations

import math
import numbers
import numpy as np
import torch

__all__ = [
    "TEMPERATURE_RANGE", "TEMPERATURE_WHY", "INT32_MAX", "real", "count", "temperature", "index_table", "int32_index",
    "targets",
    "logit_rows", "same_device", "texts",
]  # fmt: skip

INT32_MAX = 2**31 - 1

# The temperatures the float32 kernels compute exactly; the kernels' host check (csrc/common/checks.cpp) holds the
# same bounds. See temperature().
TEMPERATURE_RANGE = (1e-10, 10.0)
TEMPERATURE_WHY = (
    "above it the pooled distributions of a student and its teacher nearly agree and their divergence shrinks like "
    "1/tau^2 while the loss multiplies it by tau^2: float32 rounding of the probabilities (1e-7) then decides the "
    "mean/logmean KD, P-KL and ULD losses and the order of the sorted-L1 ranks (KD off by 3e-5 at tau = 30, ULD's "
    "gradient meaningless at 100); below it tau^2, which scales every loss, nears float32's underflow and 1/tau "
    "scales log-probabilities past float32's range for logit gaps above 3e28"
)


def _type_name(value) -> str:
    return type(value).__name__


def real(value, name: str, *, minimum: float | None = None, positive: bool = False, finite: bool = True) -> float:
    """``value`` as a Python float: any real number (int, float, NumPy scalar, 0-d tensor), not a bool."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {_type_name(value)} {value!r}")
    try:
        result = float(value)
    except OverflowError:
        text = repr(value)
        text = text if len(text) <= 24 else f"{text[:12]}... ({len(text)} digits)"
        raise ValueError(f"{name}: {text} is too large for a float") from None
    if finite and not math.isfinite(result):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if positive and not result > 0:
        raise ValueError(f"{name}: expected a number > 0, got {value!r}")
    if minimum is not None and not result >= minimum:
        raise ValueError(f"{name}: expected a number >= {minimum:g}, got {value!r}")
    return result


def count(value, name: str, *, minimum: int = 0, maximum: int | None = None) -> int:
    """``value`` as a Python int: any integer (int, NumPy integer, 0-d integer tensor), not a bool."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_floating_point:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {_type_name(value)} {value!r}")
    result = int(value)
    if result < minimum or (maximum is not None and result > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name}: expected an integer {bound}, got {result}")
    return result


def temperature(value, name: str = "temperature") -> float:
    """tau as a float in :data:`TEMPERATURE_RANGE`, the range in which every loss matches the float64 reference
    to float32 precision (:data:`TEMPERATURE_WHY` says why not beyond it)."""
    tau = real(value, name, positive=True)
    low, high = TEMPERATURE_RANGE
    if not low <= tau <= high:
        raise ValueError(
            f"{name}: {tau:g} is outside [{low:g}, {high:g}], the range the float32 kernels compute exactly: "
            + TEMPERATURE_WHY
        )
    return tau


def _as_tensor(value, name: str, expected: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"{name}: expected {expected}, got {_type_name(value)} {value!r}")
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name}: expected {expected}, got {_type_name(value)} ({e})") from None


def _check_integer_dtype(t: torch.Tensor, name: str, expected: str) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected {expected}, got dtype {t.dtype}")


def int32_index(t: torch.Tensor, name: str, low: int = -(2**31), high: int = INT32_MAX) -> torch.Tensor:
    """An integer tensor narrowed to int32 after checking, in its own dtype, that every value lies in
    [low, high] (so no value wraps around modulo 2^32). int32 input is returned as is."""
    _check_integer_dtype(t, name, "an integer tensor")
    if t.dtype == torch.int32 or t.numel() == 0 or t.is_meta:
        return t.to(torch.int32)
    lo, hi = (int(v) for v in torch.aminmax(t))
    if lo < low or hi > high:
        position = [int(i) for i in torch.nonzero((t < low) | (t > high))[0]]  # the first offending entry
        raise ValueError(
            f"{name}: entry {position} = {int(t[tuple(position)])} is outside [{low}, {high}]"
            + (" (the int32 range the kernels index with)" if (low, high) == (-(2**31), INT32_MAX) else "")
        )
    return t.to(torch.int32)


def _check_movable(t: torch.Tensor, name: str, device: torch.device) -> None:
    """A small index tensor may follow the logits to their device, but a meta tensor holds no values to move."""
    if t.is_meta and torch.device(device).type != "meta":
        raise ValueError(f"{name} is on meta but the logits are on {device}; a meta tensor holds no values")


def index_table(value, name: str, columns: int, device: torch.device, expected: str) -> torch.Tensor:
    """An integer ``[K, columns]`` table (``expected`` describes it) as int32 on ``device``. An empty list
    is K = 0; a table on another device is moved to ``device`` (index tables are small), unless it is a meta
    tensor. Values are range-checked against int32 before narrowing."""
    expected = f"an integer [K, {columns}] table {expected}"
    if not isinstance(value, torch.Tensor) and isinstance(value, (list, tuple)) and len(value) == 0:
        return torch.zeros(0, columns, dtype=torch.int32, device=device)
    t = _as_tensor(value, name, expected)
    _check_integer_dtype(t, name, expected)
    if t.numel() == 0 and t.dim() < 2:
        t = t.reshape(0, columns)
    _check_movable(t, name, device)
    return int32_index(t, name).to(device)


def targets(value, name: str, device: torch.device) -> torch.Tensor | None:
    """The realized next tokens of the rows (``merge="bayes"``) as int64 on ``device``; None stays None."""
    if value is None:
        return None
    t = _as_tensor(value, name, "an integer tensor of token ids (-1 where none)")
    _check_integer_dtype(t, name, "an integer tensor of token ids (-1 where none)")
    _check_movable(t, name, device)
    return t.reshape(-1).to(device=device, dtype=torch.int64)


def logit_rows(logits, name: str) -> torch.Tensor:
    """``[N, V]`` or ``[B, T, V]`` logits as ``[rows, V]``."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {_type_name(logits)}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"{name}: expected [N, V] or [B, T, V] logits, got shape {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name}: the vocabulary dimension is empty (shape {tuple(logits.shape)})")
    return logits.reshape(-1, logits.shape[-1])


def same_device(tensors: dict[str, torch.Tensor | None], op: str | None = None) -> None:
    """Raise unless every tensor of ``tensors`` (name -> tensor or None) is on one device. Fake tensors report
    the device they stand for, so under ``torch.compile`` this checks the real placement; a meta tensor mixed
    with real ones is an error (the dispatcher would otherwise run the fake kernel and return garbage)."""
    present = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = present[0]
    for n, t in present[1:]:
        if t.device != first.device:
            raise RuntimeError(
                (f"xtoken::{op}: " if op else "")
                + f"{n} is on {t.device} but {first_name} is on {first.device}; move every tensor to the same device"
            )


def texts(value, name: str = "texts") -> list[str]:
    """A batch of texts as a list of str (any iterable of str, read once), each encodable as UTF-8."""
    if isinstance(value, (str, bytes)) or value is None or not hasattr(value, "__iter__"):
        raise TypeError(f"{name}: expected a sequence of str, got {_type_name(value)}")
    result = list(value)
    for i, text in enumerate(result):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{i}]: expected a str, got {_type_name(text)}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            c = ord(text[e.start])
            what = (f"the byte 0x{c - 0xDC00:02x}, which is not valid UTF-8" if 0xDC80 <= c <= 0xDCFF
                    else f"the lone surrogate U+{c:04X}")
            raise ValueError(
                f"{name}[{i}]: character {e.start} is {what}; alignment works on the UTF-8 bytes of each text"
            ) from None
    return result

