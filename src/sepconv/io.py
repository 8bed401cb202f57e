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

import contextlib
import importlib
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import ModelError, WeightsError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1

# --------------------------------------------------------------------------- atomic files


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:  # flush to disk before the rename
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_path` (for checkpoints of plain tensors/dicts)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


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
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path}: not a valid safetensors file ({_one_line(e)})") from None
        return sd
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(
            f"{path}: refused to load: the file needs arbitrary unpickling, which can run code "
            f"(only tensors/dicts are accepted; {_one_line(e)[:120]})"
        ) from None
    except Exception as e:  # zip/EOF/magic-number errors of a corrupt file
        raise WeightsError(f"{path}: not a readable weights file ({_one_line(e)[:160]})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a mapping of parameter names to tensors")
    return obj


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# --------------------------------------------------------------------------- recipes

# op name -> function(model, step: dict) -> model, replaying a structural change.
_RECIPES: dict[str, Callable[[nn.Module, dict], nn.Module]] = {}
# op name -> module that registers it (imported lazily so io stays low in the layering)
_RECIPE_PROVIDERS = {
    "convert": "sepconv.decompose",
    "spectral_normalize": "sepconv.normalize",
}


def register_recipe(op: str):
    """Decorator: ``fn(model, step) -> model`` rebuilds the structure a recipe step made."""

    def wrap(fn):
        _RECIPES[op] = fn
        return fn

    return wrap


def record_recipe(model: nn.Module, op: str, **args) -> None:
    """Append a structural change to ``model.sepconv_config['recipe']`` (JSON-serialisable)."""
    cfg = getattr(model, "sepconv_config", None)
    if cfg is None:
        cfg = {"recipe": []}
        model.sepconv_config = cfg
    cfg.setdefault("recipe", []).append({"op": op, **json.loads(json.dumps(args))})


def _replay(model: nn.Module, step: dict) -> nn.Module:
    op = step.get("op")
    if op not in _RECIPES and op in _RECIPE_PROVIDERS:
        importlib.import_module(_RECIPE_PROVIDERS[op])
    if op not in _RECIPES:
        raise WeightsError(f"config.json: unknown recipe step {op!r}")
    return _RECIPES[op](model, step)


# --------------------------------------------------------------------------- models


def save_model(model: nn.Module, directory: str | os.PathLike, config: dict | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` for ``model`` into ``directory``.

    The model must come from :func:`sepconv.models.create_model` (which records how it was
    built), or ``config`` must say how to rebuild it: ``{"factory": "pkg.mod:fn",
    "kwargs": {...}}``. Returns the directory.
    """
    from safetensors.torch import save_model as _st_save

    import sepconv

    cfg = config if config is not None else getattr(model, "sepconv_config", None)
    if cfg is None or not ("name" in cfg or "factory" in cfg):
        raise ModelError(
            "save_model: the model does not say how to rebuild it; build it with "
            "sepconv.models.create_model or pass config={'factory': 'pkg.mod:fn', 'kwargs': {...}}"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    full = {"format": FORMAT_VERSION, "sepconv_version": sepconv.__version__, **cfg}
    full.setdefault("recipe", [])
    text = json.dumps(full, indent=2, sort_keys=False)
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        _st_save(model, str(tmp))
    atomic_write_text(directory / CONFIG_NAME, text + "\n")
    return directory


def build_from_config(cfg: dict, trust_code: bool = False) -> nn.Module:
    """Rebuild a model's structure (random weights) from a ``config.json`` dictionary."""
    from .models import create_model

    if "name" in cfg:
        model = create_model(cfg["name"], **cfg.get("kwargs", {}))
    elif "factory" in cfg:
        if not trust_code:
            raise WeightsError(
                f"config.json names the factory {cfg['factory']!r}; importing it runs its code: "
                "pass trust_code=True if you trust it"
            )
        model = import_factory(cfg["factory"])(**cfg.get("kwargs", {}))
        model.sepconv_config = {"factory": cfg["factory"], "kwargs": cfg.get("kwargs", {}), "recipe": []}
    else:
        raise WeightsError("config.json has neither a model 'name' nor a 'factory'")
    for step in cfg.get("recipe", []):
        model = _replay(model, step)
    model.sepconv_config["recipe"] = list(cfg.get("recipe", []))
    return model


def load_model(directory: str | os.PathLike, map_location: str | torch.device = "cpu",
               trust_code: bool = False) -> nn.Module:
    """Rebuild a model saved by :func:`save_model` and load its weights (strictly)."""
    directory = Path(directory)
    cfg_path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise WeightsError(f"{directory}: not a model directory (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    if not cfg_path.is_file():
        raise WeightsError(f"{directory}: missing {CONFIG_NAME} (a sepconv model directory holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{cfg_path}: not valid JSON ({_one_line(e)})") from None
    if not isinstance(cfg, dict):
        raise WeightsError(f"{cfg_path}: expected a JSON object")
    model = build_from_config(cfg, trust_code=trust_code)
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
        raise ModelError(f"{spec!r}: cannot import {mod_name!r} ({_one_line(e)})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"{spec!r}: {mod_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"{spec!r} is not callable")
    return obj


def _accepted_kwargs(fn: Callable, kwargs: dict) -> dict:
    """The subset of ``kwargs`` that ``fn``'s signature accepts."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def model_from_spec(spec: str, *, num_classes: int | None = None, in_chans: int | None = None,
                    weights: str | None = None, **kwargs) -> nn.Module:
    """The command line's MODEL argument: a registry name, a saved directory, or
    ``package.module:callable``; optional ``weights`` file loaded strictly on top."""
    from .models import create_model

    p = Path(spec)
    if p.is_dir():
        model = load_model(p, trust_code=True)  # the user named this directory explicitly
    elif ":" in spec and not p.exists():
        factory = import_factory(spec)
        extra = {k: v for k, v in dict(num_classes=num_classes, **kwargs).items() if v is not None}
        extra = _accepted_kwargs(factory, extra)
        model = factory(**extra)
        if not isinstance(model, nn.Module):
            raise ModelError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
        model.sepconv_config = {"factory": spec, "kwargs": extra, "recipe": []}
    else:
        extra = {k: v for k, v in dict(num_classes=num_classes, in_chans=in_chans).items() if v is not None}
        model = create_model(spec, **extra, **kwargs)
    if weights:
        load_weights_into(model, load_state_dict(weights), source=str(weights))
    return model
