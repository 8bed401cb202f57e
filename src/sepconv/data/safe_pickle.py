"""Dataset pickles (CIFAR's Python format) read without running code.

A pickle is a program: its GLOBAL opcodes name any callable, which the unpickler then calls. This
module reads one in two passes. :func:`_scan_pickle` first walks the opcodes without building
anything and refuses what a dataset pickle never needs (class instantiation, persistent ids, the
extension registry, sets, out-of-band buffers), globals other than numpy's array machinery,
lengths past the end of the file, absurd memo indices and more dict keys than a dataset holds.
Only then does :class:`_ArrayOnlyUnpickler` build the data, handing the pickle stand-ins for
numpy's reconstructors that accept exactly what numpy writes, so every array consists of bytes the
file holds (no zero-stride views of any size). Any refusal is one :class:`~sepconv.errors.DataError`
naming the file.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..guard import check_memory, format_bytes
from .safe_files import read_bytes

__all__ = ["check_array", "safe_unpickle"]

#: Upper bound of the memory one pickle opcode can make the unpickler allocate beyond the bytes it
#: carries (a Python object, its memo entry and stack slot); the estimate of an unpickling is
#: ``3 x file size + this x opcodes`` (the file, the strings it holds, the bytes built from them).
_PICKLE_BYTES_PER_OP = 128
#: Dict keys one pickle may insert in all (a CIFAR batch has 4): colliding int or tuple keys would
#: make the inserts quadratic -- a pickle that takes hours is as hostile as one that runs code.
_PICKLE_MAX_DICT_KEYS = 4096
_REFUSED_OPCODES = {
    **dict.fromkeys(("INST", "OBJ", "NEWOBJ", "NEWOBJ_EX"), "it instantiates a class"),
    **dict.fromkeys(("EXT1", "EXT2", "EXT4"), "it uses the copyreg extension registry"),
    **dict.fromkeys(("PERSID", "BINPERSID"), "it uses persistent ids"),
    **dict.fromkeys(("EMPTY_SET", "ADDITEMS", "FROZENSET"), "it builds sets"),
    **dict.fromkeys(("NEXT_BUFFER", "READONLY_BUFFER"), "it uses out-of-band buffers"),
}


class _Refused(Exception):
    """Raised inside the unpickler; :func:`safe_unpickle` adds the file name."""


class _Malformed(Exception):
    """Raised by :func:`_pickle_ops` (a truncated pickle, an unknown opcode, a length past the end);
    :func:`_scan_pickle` turns it into a :class:`DataError` naming the file."""


def _refuse_global(path: Path, module: str, name: str) -> DataError:
    return DataError(f"{path}: refused to unpickle: it asks for the global {module}.{name}, which would "
                     f"execute code; a dataset pickle may only hold numpy arrays, lists, dicts, strings, "
                     f"bytes and numbers")


_OPCODES = {ord(op.code): op for op in pickletools.opcodes}
_COUNT_BYTES = {pickletools.TAKEN_FROM_ARGUMENT1: 1, pickletools.TAKEN_FROM_ARGUMENT4: 4,
                pickletools.TAKEN_FROM_ARGUMENT4U: 4, pickletools.TAKEN_FROM_ARGUMENT8U: 8}


def _pickle_ops(data: bytes):
    """``(opcode, arg, pos)`` of each opcode of the pickle ``data`` up to STOP, like
    ``pickletools.genops`` -- but the payload of a counted string or bytes is skipped, not decoded,
    and ``arg`` is decoded only where :func:`_scan_pickle` looks at it (GLOBAL, PUT, FRAME);
    :class:`_Malformed` for a truncated pickle, an unknown opcode or a length past the end."""
    n, pos = len(data), 0
    while pos < n:
        op = _OPCODES.get(data[pos])
        if op is None:
            raise _Malformed(f"unknown opcode 0x{data[pos]:02x} at byte {pos}")
        start, pos, desc, arg = pos, pos + 1, op.arg, None
        if desc is None:
            pass
        elif desc.n > 0:
            if pos + desc.n > n:
                raise _Malformed(f"{op.name} at byte {start} is cut off")
            if op.name in ("BINPUT", "LONG_BINPUT", "FRAME"):
                arg = int.from_bytes(data[pos:pos + desc.n], "little")
            pos += desc.n
        elif desc.n == pickletools.UP_TO_NEWLINE:
            end = pos
            for _ in range(2 if desc.name == "stringnl_noescape_pair" else 1):
                end = data.find(b"\n", end) + 1
                if end == 0:
                    raise _Malformed(f"{op.name} at byte {start} is cut off (no newline)")
            if op.name == "GLOBAL":
                arg = " ".join(data[pos:end].decode("latin1").split())
            elif op.name == "PUT":
                arg = int(data[pos:end])
            pos = end
        else:
            k = _COUNT_BYTES[desc.n]
            if pos + k > n:
                raise _Malformed(f"{op.name} at byte {start} is cut off")
            length = int.from_bytes(data[pos:pos + k], "little", signed=desc.n == pickletools.TAKEN_FROM_ARGUMENT4)
            pos += k
            if not 0 <= length <= n - pos:
                raise _Malformed(f"{op.name} at byte {start} claims {length} bytes, but only {n - pos} remain")
            pos += length
        yield op, arg, start
        if op.name == "STOP":
            return
    raise _Malformed("the pickle ends without a STOP opcode (truncated)")


def _scan_pickle(data: bytes, path: Path) -> int:
    """Walk the opcodes of ``data`` without building anything; the number of opcodes.

    Refused before the real unpickler runs: the opcodes a dataset pickle never needs
    (:data:`_REFUSED_OPCODES`), globals other than numpy's, a counted string, bytes or frame
    longer than the rest of the file (:func:`_pickle_ops` reads lengths, not payloads: nothing of
    a claimed length is allocated), a memo index beyond the opcodes seen so far (the C unpickler
    sizes its memo table by the index: 8 bytes, ``r\\xff\\xff\\xff\\x3f``, would cost 16 GiB), and
    more than :data:`_PICKLE_MAX_DICT_KEYS` dict keys (counted with the stack depths that
    ``pickletools.dis`` tracks).
    """
    mark = pickletools.markobject
    depth, marks, ops, keys = 0, [], 0, 0
    try:
        for op, arg, pos in _pickle_ops(data):
            ops += 1
            name, before, after = op.name, op.stack_before, op.stack_after
            if name in _REFUSED_OPCODES:
                raise DataError(f"{path}: refused to unpickle: {_REFUSED_OPCODES[name]} (opcode {name} at "
                                f"byte {pos}); a dataset pickle may only hold numpy arrays, lists, dicts, "
                                f"strings, bytes and numbers")
            if name == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
                if (module, attr) not in _ArrayOnlyUnpickler.ADMITTED:
                    raise _refuse_global(path, module, attr)
            elif name in ("PUT", "BINPUT", "LONG_BINPUT") and arg > ops:
                raise DataError(f"{path}: malformed pickle (memo index {arg} at byte {pos} after {ops} "
                                f"opcodes; picklers number their memo entries 0, 1, 2, ...)")
            elif name == "FRAME" and arg > len(data) - pos:
                raise DataError(f"{path}: malformed pickle (a frame of {arg} bytes at byte {pos}, past "
                                f"the end of the {len(data)}-byte file)")
            if mark in before or (name == "POP" and marks and depth == marks[-1]):
                if not marks:
                    raise DataError(f"{path}: malformed pickle ({name} at byte {pos} without a MARK)")
                top = marks.pop()
                if name in ("SETITEMS", "DICT"):
                    keys += (depth - top) // 2
                depth = top - (before.index(mark) if mark in before else 0)
            else:
                depth -= len(before)
                keys += name == "SETITEM"
            if depth < 0:
                raise DataError(f"{path}: malformed pickle ({name} at byte {pos} pops an empty stack)")
            if mark in after:
                marks.append(depth)
            else:
                depth += len(after)
            if keys > _PICKLE_MAX_DICT_KEYS:
                raise DataError(f"{path}: refused to unpickle: its dicts hold more than "
                                f"{_PICKLE_MAX_DICT_KEYS} keys (a dataset pickle has a handful)")
    except DataError:
        raise
    except _Malformed as e:  # NB: worded as the ValueError it once was, so the message is unchanged
        raise DataError(f"{path}: malformed pickle (ValueError: {e})") from None
    except (ValueError, struct.error, EOFError) as e:  # a bad number (int() of a PUT argument)
        raise DataError(f"{path}: malformed pickle ({type(e).__name__}: {e})") from None
    return ops


class _NdarrayToken:
    """What a pickle gets for ``numpy.ndarray``: an argument for ``_reconstruct``, not a callable.
    Calling ``numpy.ndarray(shape, dtype, buffer, offset, strides)`` views a few bytes as an array
    of any size (zero strides: 163 bytes can ask for 8.6 GiB, which a copy then allocates)."""

    __slots__ = ()

    def __call__(self, *args: Any) -> Any:
        raise _Refused("it calls numpy.ndarray(...) directly, which views a few bytes as an array of any "
                       "shape and strides (numpy itself writes arrays through _reconstruct)")


_NDARRAY = _NdarrayToken()
_reconstruct_array = np.zeros(0).__reduce__()[0]  # numpy's _reconstruct, whichever module it lives in


class _DType:
    """A pickled dtype, built from a plain number type only; its pickled state may set the byte order."""

    __slots__ = ("dtype",)
    _SPEC = re.compile(r"[<>|=]?(b1|[iu][1248]|f[248]|c(8|16))")

    def __init__(self, spec: Any, align: Any = False, copy: Any = False) -> None:
        if isinstance(spec, bytes):
            spec = spec.decode("latin1")
        if not isinstance(spec, str) or not self._SPEC.fullmatch(spec):
            raise _Refused(f"numpy.dtype({spec!r:.40}) is not a plain number type (bool, int, uint, "
                           f"float, complex)")
        self.dtype = np.dtype(spec)

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)
                and all(s is None for s in state[2:5]) and state[5] in (-1, self.dtype.itemsize)):
            raise _Refused(f"a {self.dtype} dtype with the state {state!r:.80} (fields, subarrays or "
                           f"another size)")
        order = state[1].decode("latin1") if isinstance(state[1], bytes) else state[1]
        if order not in ("<", ">", "|", "="):
            raise _Refused(f"dtype byte order {order!r:.20}")
        if order in "<>":
            self.dtype = self.dtype.newbyteorder(order)


def _plain_dtype(dt: Any) -> np.dtype:
    if not isinstance(dt, _DType):
        raise _Refused(f"an array's dtype is a {type(dt).__name__}, not a numpy.dtype")
    return dt.dtype


def _check_shape(shape: Any, dtype: np.dtype, nbytes: int) -> tuple[int, ...]:
    """``shape`` of an array that ``nbytes`` of raw data fill exactly (sizes in Python integers)."""
    if not (isinstance(shape, tuple) and len(shape) <= 32
            and all(type(d) is int and d >= 0 for d in shape)):
        raise _Refused(f"an array shape {shape!r:.80} (not a tuple of at most 32 sizes)")
    need = dtype.itemsize
    for d in shape:
        need *= d
    if need != nbytes:
        raise _Refused(f"an array of shape {shape} and dtype {dtype} needs {need} bytes of data but the "
                       f"pickle holds {nbytes}")
    return shape


class _CheckedArray(np.ndarray):
    """What ``_reconstruct`` builds: an empty array whose pickled state is checked before numpy's
    ``__setstate__`` sees it -- a plain number dtype and exactly the raw bytes its shape needs, bytes
    that the pickle holds (so an array is never larger than its file)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        raise _Refused("numpy.ndarray(...) called directly")

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) in (4, 5)):
            raise _Refused(f"an array state {type(state).__name__} (not (version, shape, dtype, fortran, data))")
        shape, dt, fortran, raw = state[-4:]
        dtype = _plain_dtype(dt)
        if not isinstance(raw, (bytes, bytearray)):
            raise _Refused(f"an array of {dtype} whose data is a {type(raw).__name__}, not bytes")
        shape = _check_shape(shape, dtype, len(raw))
        np.ndarray.__setstate__(self, (1, shape, dtype, fortran is True or fortran == 1, bytes(raw)))


def _np_reconstruct(subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
    if subtype is not _NDARRAY or shape != (0,) or typecode not in (b"b", "b"):
        raise _Refused(f"numpy's _reconstruct called as {subtype!r:.40}, {shape!r:.40}, {typecode!r:.10} "
                       f"rather than as numpy writes it (ndarray, (0,), b'b')")
    return _reconstruct_array(_CheckedArray, (0,), b"b")


def _np_scalar(dt: Any, raw: Any = None) -> Any:
    dtype = _plain_dtype(dt)
    if not isinstance(raw, bytes) or len(raw) != dtype.itemsize:
        raise _Refused(f"a numpy {dtype} scalar from {type(raw).__name__} data")
    return np.frombuffer(raw, dtype, count=1)[0]


def _np_frombuffer(buf: Any, dt: Any, shape: Any, order: Any, axis_order: Any = None) -> np.ndarray:
    dtype = _plain_dtype(dt)
    if not isinstance(buf, (bytes, bytearray)) or order not in ("C", "F") or axis_order is not None:
        raise _Refused(f"numpy's _frombuffer with {type(buf).__name__} data and order {order!r:.10}")
    return np.frombuffer(buf, dtype).reshape(_check_shape(shape, dtype, len(buf)), order=order)


def _latin1_bytes(text: Any, encoding: Any) -> bytes:
    if not isinstance(text, str) or encoding != "latin1":
        raise _Refused(f"_codecs.encode with {encoding!r:.20}")
    return text.encode("latin1")


class _Admitted:
    """A callable handed to a pickle; immutable (no ``__dict__``, no settable slot), so that BUILD
    cannot alter it for this or any later unpickling."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Any) -> None:
        object.__setattr__(self, "_fn", fn)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(key)

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)


#: Where numpy's reconstructors live: ``numpy.core`` before NumPy 2, ``numpy._core`` since.
_MULTIARRAY = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMERIC = ("numpy.core.numeric", "numpy._core.numeric")


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that builds numpy arrays and plain Python data, and refuses every other global.

    Containers, strings, bytes and numbers need no globals; numpy arrays need the reconstructor,
    ``ndarray``, ``dtype`` (and ``scalar``/``_frombuffer`` for scalars and protocol 5), under
    both the ``numpy.core`` and ``numpy._core`` spellings. Python 3 writes ``bytes`` in
    protocol 2 as ``_codecs.encode(text, "latin1")`` or ``bytes()``: both are admitted only in
    exactly that form. None of these is numpy's own function: each is a stand-in that accepts only
    what numpy writes (``_reconstruct(ndarray, (0,), b'b')`` then a checked ``__setstate__``, plain
    number dtypes, data bytes that fill the shape exactly), so every array consists of bytes the
    file holds: ``numpy.ndarray(shape, dtype, buffer, offset, strides)`` -- a zero-stride view of any
    size -- is refused.
    """

    ADMITTED: dict[tuple[str, str], Any] = {
        **{(m, "_reconstruct"): _Admitted(_np_reconstruct) for m in _MULTIARRAY},
        **{(m, "scalar"): _Admitted(_np_scalar) for m in _MULTIARRAY},
        **{(m, "_frombuffer"): _Admitted(_np_frombuffer) for m in _NUMERIC},
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _Admitted(_DType),
        ("_codecs", "encode"): _Admitted(_latin1_bytes),
        ("__builtin__", "bytes"): _Admitted(lambda: b""),
        ("builtins", "bytes"): _Admitted(lambda: b""),
    }

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        found = self.ADMITTED.get((module, name))
        if found is None:
            raise _refuse_global(self.path, module, name)
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self.path}: refused to unpickle: it uses persistent ids")


def safe_unpickle(path: Path, limit: int | None = None) -> Any:
    """Read a pickle of arrays and plain data without executing code; see the unpickler.

    The file (a regular file, at most ``limit`` bytes when given) is read into memory and its
    opcodes scanned first (:func:`_scan_pickle`); the memory it can make the unpickler allocate is
    checked against the budget before anything is built.
    """
    data = read_bytes(path, "a pickle", limit)
    ops = _scan_pickle(data, path)
    check_memory(3 * len(data) + _PICKLE_BYTES_PER_OP * ops, f"unpickling {path} ({ops} opcodes)")
    try:
        return _plain_arrays(_ArrayOnlyUnpickler(io.BytesIO(data), path).load(), 0, set())
    except DataError:
        raise
    except _Refused as e:
        raise DataError(f"{path}: refused to unpickle: {e}") from None
    except Exception as e:  # a malformed pickle can raise almost anything
        raise DataError(f"{path}: malformed pickle ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None


def _plain_arrays(obj: Any, depth: int, seen: set[int]) -> Any:
    """``obj`` with every :class:`_CheckedArray` in its dicts, lists and tuples as a plain ndarray
    view (dicts and lists changed in place, tuples rebuilt; cycles followed once)."""
    if isinstance(obj, _CheckedArray):
        return obj.view(np.ndarray)
    if type(obj) not in (dict, list, tuple) or id(obj) in seen:
        return obj
    if depth > 100:
        raise _Refused("containers nested more than 100 deep")
    seen.add(id(obj))
    if type(obj) is tuple:
        return tuple(_plain_arrays(v, depth + 1, seen) for v in obj)
    for k, v in obj.items() if type(obj) is dict else enumerate(obj):
        obj[k] = _plain_arrays(v, depth + 1, seen)
    return obj


def check_array(path: Path, a: Any, key: str, file_size: int) -> np.ndarray:
    """``a`` as a plain ndarray, if it consists of real bytes of the file: contiguous, positive
    strides, at most ``file_size`` bytes (a broadcast or zero-stride view is refused before any copy)."""
    if not isinstance(a, np.ndarray):
        raise DataError(f"{path}: {key!r} must be a numpy array, got {type(a).__name__}")
    if a.dtype.hasobject or a.dtype.fields is not None:
        raise DataError(f"{path}: {key!r} must be an array of numbers, got dtype {a.dtype}")
    if (a.nbytes > file_size or not (a.flags.c_contiguous or a.flags.f_contiguous)
            or any(s <= 0 for s, d in zip(a.strides, a.shape) if d > 1)):
        raise DataError(f"{path}: {key!r} is a {a.shape} view with strides {a.strides} "
                        f"({format_bytes(a.nbytes)} from a {file_size}-byte file), not data; refused")
    return np.asarray(a).view(np.ndarray)

