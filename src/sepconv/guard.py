"""Guards against hostile input and hostile environments.

Everything sepconv reads may come from elsewhere (a model directory, a checkpoint, a dataset)
and everything it writes may meet a full disk or a read-only directory. The checks here run
*before* the work they protect, and each failure is one :class:`~sepconv.errors.SepconvError`
whose message names the file, layer or argument and the reason:

* memory -- :func:`memory_budget` (the machine's RAM, its cgroup or rlimit caps, or
  ``$SEPCONV_MEMORY_LIMIT``), :func:`check_memory` refuses an allocation above it with the
  estimate, :func:`forward_memory` estimates a forward pass on the ``meta`` device (shapes
  only: no memory, no arithmetic);
* weights -- :func:`check_finite` names the first layer holding NaN or Inf;
* outputs -- :func:`writable_dir` and :func:`writable_file` prove an output location
  writable before any work starts, :func:`os_reason` turns an ``OSError`` into the words of
  a one-line message.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import tempfile
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from .errors import ConfigError, OutputError, ResourceError

__all__ = [
    "MEMORY_ENV",
    "check_finite",
    "check_memory",
    "format_bytes",
    "forward_memory",
    "meta_forward",
    "param_dtype",
    "memory_budget",
    "model_bytes",
    "os_reason",
    "parse_bytes",
    "tensor_bytes",
    "writable_dir",
    "writable_file",
]

#: Environment variable: the memory budget in bytes (suffixes K, M, G, T: powers of 1024).
MEMORY_ENV = "SEPCONV_MEMORY_LIMIT"

_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}

# --------------------------------------------------------------------------- memory


def format_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``: a size for a message."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def parse_bytes(text: str) -> int:
    """``'8G' -> 8 * 2**30``; bytes with an optional K/M/G/T suffix (powers of 1024)."""
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = s[-1:] if s[-1:] in _UNITS else ""
    try:
        value = float(s[: len(s) - len(unit)])
    except ValueError:
        raise ConfigError(f"{MEMORY_ENV}={text!r}: expected bytes, e.g. 8G or 512M") from None
    if not (value > 0 and value * _UNITS[unit] < 2**63):
        raise ConfigError(f"{MEMORY_ENV}={text!r}: expected a positive size, e.g. 8G or 512M")
    return int(value * _UNITS[unit])


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # v1 writes ~2**63 for "no limit"
            return int(text)
    return None


def memory_budget() -> int:
    """Bytes a single allocation plan may use: ``$SEPCONV_MEMORY_LIMIT`` when set, else the
    smallest of the machine's physical memory, the cgroup's limit and ``RLIMIT_AS``/``RLIMIT_DATA``."""
    env = os.environ.get(MEMORY_ENV)
    if env:
        return parse_bytes(env)
    caps = []
    try:
        caps.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        pass
    caps.append(_cgroup_limit())
    for lim in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
        soft = resource.getrlimit(lim)[0]
        caps.append(None if soft == resource.RLIM_INFINITY else soft)
    caps = [c for c in caps if c]
    return min(caps) if caps else 2**63 - 1


def check_memory(nbytes: float, what: str, budget: int | None = None, hint: str = "") -> None:
    """Refuse (:class:`~sepconv.errors.ResourceError`) when ``what`` needs more than ``budget`` bytes
    (default :func:`memory_budget`), with the estimate and how to change the budget in the message
    (``hint``, e.g. which option to lower, then the environment variable)."""
    budget = memory_budget() if budget is None else budget
    if nbytes > budget:
        raise ResourceError(f"{what} needs about {format_bytes(nbytes)}, more than the memory budget of "
                            f"{format_bytes(budget)}; {hint + ', or ' if hint else ''}set {MEMORY_ENV} to change it")


def tensor_bytes(shape: Sequence[int], dtype: torch.dtype = torch.float32) -> int:
    """Bytes of a dense tensor of ``shape`` and ``dtype`` (exact Python integers: no overflow)."""
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def model_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers (shared tensors once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen and not is_lazy(t):
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of tensors that ops create and that are still alive; records the peak."""

    def __init__(self, start: int = 0):
        super().__init__()
        self.live = self.peak = start

    def _release(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(a) for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, Tensor) and id(t) not in inputs and not t._is_view():
                n = t.numel() * t.element_size()
                self.live += n
                weakref.finalize(t, self._release, n)
        self.peak = max(self.peak, self.live)
        return out


def param_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of ``model``'s first parameter when it is floating, else float32: the dtype its
    activations are estimated in."""
    p = next(iter(model.parameters()), None)
    return p.dtype if p is not None and p.is_floating_point() else torch.float32


def meta_forward(model: nn.Module, input_shape: Sequence[int], batch: int = 1, training: bool = False,
                 dtype: torch.dtype | None = None, mode=None):
    """The output of one forward pass of ``model`` on a batch of ``input_shape`` on the ``meta``
    device: shapes only, nothing allocated and nothing computed (the parameters and buffers are
    swapped for meta tensors of the same shapes through ``torch.func.functional_call``; the
    model's own tensors are untouched). ``training`` sets the model's mode and autograd for the
    pass (the previous mode is restored); ``mode``, a ``TorchDispatchMode``, watches it. ``None``
    when the model cannot run on meta tensors (data-dependent control flow) or has lazy
    parameters."""
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    if any(is_lazy(v) for _, v in tensors):  # shapes not known before the first real forward
        return None
    dtype = dtype or param_dtype(model)
    was = model.training
    model.train(training)
    meta = {k: torch.empty_like(v, device="meta").requires_grad_(training and v.requires_grad) for k, v in tensors}
    try:
        x = torch.empty((batch, *input_shape), dtype=dtype, device="meta")
        with torch.set_grad_enabled(training), (mode or contextlib.nullcontext()):
            return torch.func.functional_call(model, meta, (x,), strict=False, tie_weights=True)
    except Exception:  # noqa: BLE001 -- a model that cannot run on meta: no answer
        return None
    finally:
        model.train(was)


def forward_memory(model: nn.Module, input_shape: Sequence[int], batch: int = 1, training: bool = False,
                   dtype: torch.dtype | None = None) -> int | None:
    """Estimated peak bytes of the activations of one forward pass of ``model`` on a batch of
    ``input_shape`` = (C, H, W), the input included; with ``training=True`` the pass records an
    autograd graph, whose saved tensors stay alive as in a training step (the backward pass's
    buffers are not counted). Measured on the ``meta`` device (:func:`meta_forward`), so nothing
    is allocated and nothing computed. ``None`` when the model cannot run on meta tensors
    (data-dependent control flow) or has lazy parameters."""
    dtype = dtype or param_dtype(model)
    mode = _LiveBytes(tensor_bytes((batch, *input_shape), dtype))
    out = meta_forward(model, input_shape, batch, training, dtype, mode)
    return None if out is None else mode.peak


# --------------------------------------------------------------------------- weights


def check_finite(named: nn.Module | Iterable[tuple[str, Tensor]], what: str = "") -> None:
    """Raise :class:`~sepconv.errors.ConfigError` naming the first parameter or buffer holding NaN or Inf
    (a module's own parameters and floating buffers, e.g. BatchNorm's running statistics)."""
    items = ([*named.named_parameters(), *named.named_buffers()] if isinstance(named, nn.Module) else named)
    for name, t in items:
        if not is_lazy(t) and t.is_floating_point() and t.device.type != "meta" and t.numel():
            lo, hi = torch.aminmax(t.detach().reshape(-1).float())
            if not (torch.isfinite(lo) and torch.isfinite(hi)):
                bad = "NaN" if torch.isnan(t).any() else "Inf"
                layer = name.rsplit(".", 1)[0] if "." in name else name
                raise ConfigError(f"{what + ': ' if what else ''}layer {layer!r} has {bad} values in {name!r}")


# --------------------------------------------------------------------------- outputs


def os_reason(e: OSError) -> str:
    """The reason of an ``OSError`` in words, for one line: ``'No space left on device'``."""
    if e.errno == errno.EFBIG:
        return f"{e.strerror} (the file size limit; the disk or quota is full)"
    return e.strerror or " ".join(str(e).split()) or type(e).__name__


def writable_dir(path: str | os.PathLike, what: str = "output directory") -> Path:
    """Create ``path`` (with its parents) if needed and prove it writable by creating and removing
    a file in it; :class:`~sepconv.errors.OutputError` naming ``what`` and the reason otherwise."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{what} {p}: exists and is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{what} {p}: a part of the path is a file, not a directory") from None
    except OSError as e:
        raise OutputError(f"{what} {p}: cannot create it ({os_reason(e)})") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".sepconv-probe.", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{what} {p}: not writable ({os_reason(e)})") from None
    return p


def writable_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """Prove that ``path`` can be (re)written: its directory is writable and it is not a directory."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{what} {p}: is a directory, not a file")
    writable_dir(p.parent, f"{what} {p}: its directory")
    return p
