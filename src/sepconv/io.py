"""Model files: ``config.json`` (how to rebuild the model) + ``model.safetensors`` (weights).

A saved model directory holds

* ``config.json`` -- the registry name and constructor arguments, the sepconv version, and
  the *recipe*: the list of structural changes applied after construction (a conversion
  by :mod:`sepconv.decompose`, a spectral normalization by :mod:`sepconv.normalize`), each
  replayed in order by :func:`load_model` before the weights are loaded;
* ``model.safetensors`` -- the state dict, in a format that cannot carry code.

Nothing is ever read with a plain ``pickle``: ``.pt``/``.pth`` files go through
``torch.load(weights_only=True)``. Every file is written atomically (temporary file in
the same directory, then ``os.replace``), so an interrupted save never leaves a torn file.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save_model as _st_save
from torch import nn

from . import __version__
from . import decompose as _decompose  # noqa: F401  (registers the "convert" recipe op)
from . import normalize as _normalize  # noqa: F401  (registers the "spectral_normalize" recipe op)
from .deploy.export import export_onnx
from .errors import ConfigError, ModelError, OutputError, SepconvError, WeightsError, one_line
from .files import (  # re-exported: these lived here before sepconv.files
    TMP_PATTERN,
    atomic_path,
    atomic_torch_save,
    atomic_write_text,
    read_head,
    remove_stale_temporaries,
)
from .guard import os_reason, writable_dir
from .models import create_model
from .recipes import record_recipe, register_recipe, replay

__all__ = ["CONFIG_NAME", "FORMAT_VERSION", "MAX_CONFIG_BYTES", "TMP_PATTERN", "WEIGHTS_NAME", "atomic_path",
           "atomic_torch_save", "atomic_write_text", "build_from_config", "check_config", "export_onnx",
           "import_factory", "load_model", "load_state_dict", "load_weights_into", "model_from_spec", "read_config",
           "read_head", "record_recipe", "register_recipe", "remove_stale_temporaries", "save_model"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
MAX_CONFIG_BYTES = 16 * 2**20  # a config.json is a few KB; a larger one is refused unread

# --------------------------------------------------------------------------- weights files


def load_state_dict(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a state dict from ``.safetensors`` or (weights-only) ``.pt``/``.pth``/``.bin``.

    A file that needs arbitrary unpickling (a whole pickled model, custom classes, a code
    payload) is refused with :class:`WeightsError`; so is anything that is not a mapping
    of names to tensors.
    """
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    head = read_head(path, "weights file")
    if _is_safetensors(head, path):
        try:
            sd = load_file(str(path), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path}: not a valid safetensors file ({one_line(e)})") from None
        return sd
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise WeightsError(f"{path}: not a weights file: neither safetensors nor a torch.save file "
                           f"(it starts with {head[:12]!r})")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(
            f"{path}: refused to load: the file needs arbitrary unpickling, which can run code "
            f"(only tensors/dicts are accepted; {one_line(e)[:120]})"
        ) from None
    except Exception as e:  # zip/EOF/magic-number errors of a corrupt file
        raise WeightsError(f"{path}: not a readable weights file ({one_line(e)[:160]})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a mapping of parameter names to tensors")
    return obj


def _is_safetensors(head: bytes, path: Path) -> bool:
    """A safetensors file starts with the little-endian length of its JSON header, then ``{``."""
    if path.suffix == ".safetensors":
        return True
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100 * 2**20


# --------------------------------------------------------------------------- models


def save_model(model: nn.Module, directory: str | os.PathLike, config: dict | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` for ``model`` into ``directory``.

    The model must come from :func:`sepconv.models.create_model` (which records how it was
    built), or ``config`` must say how to rebuild it: ``{"factory": "pkg.mod:fn",
    "kwargs": {...}}``. Returns the directory.
    """
    cfg = config if config is not None else getattr(model, "sepconv_config", None)
    if cfg is None or not ("name" in cfg or "factory" in cfg):
        raise ModelError(
            "save_model: the model does not say how to rebuild it; build it with "
            "sepconv.models.create_model or pass config={'factory': 'pkg.mod:fn', 'kwargs': {...}}"
        )
    directory = writable_dir(directory, "model directory")
    full = {"format": FORMAT_VERSION, "sepconv_version": __version__, **cfg}
    full.setdefault("recipe", [])
    text = json.dumps(full, indent=2, sort_keys=False)
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        try:
            _st_save(model, str(tmp))
        except SafetensorError as e:  # an I/O error (full disk) inside the Rust writer
            raise OutputError(f"{directory / WEIGHTS_NAME}: cannot write ({one_line(e)})") from None
    atomic_write_text(directory / CONFIG_NAME, text + "\n")
    return directory


def _config_error(where: str, what: str) -> WeightsError:
    return WeightsError(f"{where}: {what}")


def check_config(cfg: Any, where: str = CONFIG_NAME) -> dict:
    """Validate the structure of a ``config.json`` document before anything is built from it:
    an object with a string ``name`` (a registry model) or ``factory``, ``kwargs`` an object of
    JSON values, ``recipe`` a list of objects each with a string ``op``. Values are checked by
    the code that uses them (:func:`~sepconv.models.create_model`, each recipe step)."""
    if not isinstance(cfg, dict):
        raise _config_error(where, f"expected a JSON object, got {type(cfg).__name__}")
    if "name" in cfg:
        if not isinstance(cfg["name"], str):
            raise _config_error(where, f"'name' must be a registry model name (a string), got {cfg['name']!r:.80}")
    elif "factory" in cfg:
        if not isinstance(cfg["factory"], str):
            raise _config_error(where, "'factory' must be a string 'package.module:callable', "
                                       f"got {cfg['factory']!r:.80}")
    else:
        raise _config_error(where, "has neither a model 'name' nor a 'factory'")
    kwargs = cfg.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise _config_error(where, f"'kwargs' must be an object of constructor arguments, got {type(kwargs).__name__}")
    bad = [k for k in kwargs if not (isinstance(k, str) and k.isidentifier())]
    if bad:
        raise _config_error(where, f"'kwargs' has a key that is not an argument name: {bad[0]!r:.80}")
    recipe = cfg.get("recipe", [])
    if not isinstance(recipe, list):
        raise _config_error(where, f"'recipe' must be a list of steps, got {type(recipe).__name__}")
    for i, step in enumerate(recipe):
        if not isinstance(step, dict) or not isinstance(step.get("op"), str):
            raise _config_error(where, f"recipe step {i} must be an object with a string 'op', got {step!r:.80}")
    return cfg


def build_from_config(cfg: dict, trust_code: bool = False, where: str = CONFIG_NAME) -> nn.Module:
    """Rebuild a model's structure (random weights) from a ``config.json`` dictionary.

    A config may name a registry model (``"name"``) and replay the recipe steps sepconv
    registered (:func:`register_recipe`); nothing else runs. A ``"factory"``
    (``"package.module:callable"``) imports and calls code named by the file, so it is refused
    unless the caller opts in with ``trust_code`` -- a model directory is data from elsewhere. Bad structure or
    values are a :class:`~sepconv.errors.SepconvError` naming ``where``.
    """
    check_config(cfg, where)
    kwargs = cfg.get("kwargs", {})
    if "name" in cfg:
        try:
            model = create_model(cfg["name"], **kwargs)
        except SepconvError as e:
            raise _config_error(where, one_line(e)) from None
    else:
        if not trust_code:
            raise WeightsError(
                f"{where}: refused to import the factory {cfg['factory']!r}: it would run code named by the "
                "file (a model directory may name registry models only); pass --trust-code "
                "(in Python, load_model's trust_code argument) if you trust where it came from")
        model = import_factory(cfg["factory"])(**kwargs)
        if not isinstance(model, nn.Module):
            raise _config_error(where, f"factory {cfg['factory']!r} returned {type(model).__name__}, "
                                       "not a torch.nn.Module")
        model.sepconv_config = {"factory": cfg["factory"], "kwargs": kwargs, "recipe": []}
    for i, step in enumerate(cfg.get("recipe", [])):
        model = replay(model, step, f"{where}: recipe step {i}")
    model.sepconv_config["recipe"] = list(cfg.get("recipe", []))
    return model


#: Largest ``config.json`` read (a real one is a few KiB).


def read_config(directory: str | os.PathLike) -> dict:
    """The validated ``config.json`` of a model directory (:func:`check_config`)."""
    directory = Path(directory)
    cfg_path = directory / CONFIG_NAME
    try:
        if not directory.is_dir():
            what = "no such model directory" if not directory.exists() else "not a model directory"
            raise WeightsError(f"{directory}: {what} "
                               f"(a sepconv model directory holds {CONFIG_NAME} and {WEIGHTS_NAME})")
        with open(cfg_path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise WeightsError(f"{directory}: missing {CONFIG_NAME} (a sepconv model directory holds "
                           f"{CONFIG_NAME} and {WEIGHTS_NAME})") from None
    except OSError as e:
        raise WeightsError(f"{cfg_path}: cannot read ({os_reason(e)})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise WeightsError(f"{cfg_path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; not a sepconv config")

    def refuse_constant(name: str):
        raise ValueError(f"{name} is not a JSON number")  # NB: json's hook protocol; caught below

    try:
        cfg = json.loads(raw.decode("utf-8"), parse_constant=refuse_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise WeightsError(f"{cfg_path}: not valid JSON ({one_line(e)})") from None
    return check_config(cfg, str(cfg_path))


def load_model(directory: str | os.PathLike, map_location: str | torch.device = "cpu",
               trust_code: bool = False) -> nn.Module:
    """Rebuild a model saved by :func:`save_model` and load its weights (strictly).

    ``trust_code``: allow a ``config.json`` that names a ``"factory"`` to import and call it
    (see :func:`build_from_config`); off by default."""
    directory = Path(directory)
    model = build_from_config(read_config(directory), trust_code=trust_code, where=str(directory / CONFIG_NAME))
    sd = load_state_dict(directory / WEIGHTS_NAME, map_location=map_location)
    load_weights_into(model, sd, source=str(directory / WEIGHTS_NAME))
    return model


def load_weights_into(model: nn.Module, state_dict: dict, source: str = "state dict") -> None:
    """``model.load_state_dict(state_dict, strict=True)`` with one-line errors.

    Tensors that the model shares (tied weights) may be stored once: a missing key whose
    tensor is shared with a present key is accepted.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing:
        # safetensors stores shared tensors once; accept a key whose storage another key has
        ptr = {}
        for k, v in own.items():
            ptr.setdefault((v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)), []).append(k)
        present = set(state_dict)
        missing = [k for k in missing
                   if not any(o in present for o in ptr[(own[k].untyped_storage().data_ptr(),
                                                          own[k].storage_offset(), tuple(own[k].shape))])]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[0]!r})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[0]!r})")
        raise WeightsError(f"{source}: does not match the model: {'; '.join(parts)}")
    for k, v in state_dict.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise WeightsError(f"{source}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
    model.load_state_dict(state_dict, strict=False)


def import_factory(spec: str) -> Callable[..., nn.Module]:
    """Resolve ``"package.module:callable"`` to the callable."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ModelError(f"{spec!r}: a model factory is written 'package.module:callable'")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise ModelError(f"{spec!r}: cannot import {mod_name!r} ({one_line(e)})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"{spec!r}: {mod_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"{spec!r} is not callable")
    return obj


def _accepted_kwargs(fn: Callable, kwargs: dict) -> dict:
    """The subset of ``kwargs`` that ``fn``'s signature accepts."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or "/" in spec or spec.startswith((".", "~")) or spec.endswith(".json")


def model_from_spec(spec: str, *, num_classes: int | None = None, in_chans: int | None = None,
                    weights: str | None = None, trust_code: bool = False, **kwargs) -> nn.Module:
    """The command line's MODEL argument: a registry name, a saved directory, or
    ``package.module:callable``; optional ``weights`` file loaded strictly on top.

    A ``package.module:callable`` typed by the user is imported (the user asked for that code);
    a directory is data from elsewhere and is loaded with ``trust_code`` (see
    :func:`build_from_config`), off by default."""
    p = Path(spec).expanduser()
    if p.is_dir():
        if kwargs:
            raise ConfigError(f"{spec}: a saved model directory is built from its config.json; constructor "
                              f"arguments ({', '.join(sorted(kwargs))}) apply to registry names only")
        model = load_model(p, trust_code=trust_code)
    elif p.exists():
        raise WeightsError(f"{spec}: is a file, not a model directory (a directory holds {CONFIG_NAME} and "
                           f"{WEIGHTS_NAME}; load a weights file with --weights FILE on a registry model)")
    elif ":" in spec and not _looks_like_path(spec.partition(":")[0]):
        factory = import_factory(spec)
        extra = {k: v for k, v in dict(num_classes=num_classes, **kwargs).items() if v is not None}
        extra = _accepted_kwargs(factory, extra)
        model = factory(**extra)
        if not isinstance(model, nn.Module):
            raise ModelError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
        model.sepconv_config = {"factory": spec, "kwargs": extra, "recipe": []}
    elif _looks_like_path(spec):
        where = p.parent if str(p.parent) not in ("", ".") else Path(".")
        reason = "no such directory" if os.access(where, os.X_OK) or not where.exists() else "cannot read its directory"
        raise WeightsError(f"{spec}: {reason} (MODEL is a registry name, a saved model directory or "
                           "package.module:callable)")
    else:
        extra = {k: v for k, v in dict(num_classes=num_classes, in_chans=in_chans).items() if v is not None}
        model = create_model(spec, **extra, **kwargs)
    if weights:
        load_weights_into(model, load_state_dict(weights), source=str(weights))
    return model
