"""Training checkpoints (``last.pt``, ``best.pt``): what they hold, and how a resumed run checks them.

A checkpoint holds the model, optimizer and scheduler states, the RNG states, the epoch and step,
the best accuracy, the sums of a part-done epoch (``running``) and the metrics of the epochs so far
(``history``). ``resume=True`` reads it with ``torch.load(weights_only=True)`` and checks it entry
by entry before any training: a :class:`~sepconv.errors.CheckpointError` names the file and what
is wrong. The run's settings must match the checkpoint's except those in :data:`RESUME_MAY_CHANGE`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError, WeightsError, one_line
from ..files import atomic_torch_save, read_head
from ..guard import check_finite
from ..io import load_weights_into
from .config import TrainConfig
from .rng import _checkpoint_safe, _rng_native, _rng_state

__all__ = ["RESUME_MAY_CHANGE"]

#: Settings a resumed run may change; every other :class:`TrainConfig` field must match the
#: checkpoint's, since ``--resume`` continues the same run (its model, data, order of samples,
#: optimizer and loss). ``epochs`` may grow (or shrink to no less than the checkpoint's epoch; the
#: cosine schedule stretches from there); ``out`` and ``data_dir`` may move; ``device``,
#: ``channels_last`` and ``eval_batch_size`` change how, not what, is computed; ``certify`` and
#: ``extra`` only add measurements. A different setting is a new run: ``--force`` (or ``--init``
#: from the run's ``model/``).
RESUME_MAY_CHANGE = frozenset({"epochs", "out", "data_dir", "device", "channels_last", "eval_batch_size",
                               "certify", "extra"})

#: Entries of a checkpoint and what each must be.
_CHECKPOINT_ENTRIES = {"config": (dict, "a dict"), "model": (dict, "a state dict"),
                       "optimizer": (dict, "an optimizer state dict"), "scheduler": (dict, "a scheduler state dict"),
                       "rng": (dict, "a dict of RNG states"), "epoch": (int, "an integer"),
                       "step": (int, "an integer"), "best_acc": ((int, float), "a number")}


def _read_checkpoint(path: Path) -> dict:
    """A checkpoint read with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists and
    dicts only; a file that needs more (a pickled object, a code payload) is refused unread."""
    head = read_head(path, "checkpoint", 4, CheckpointError, missing="no checkpoint to resume from")
    if not head:
        raise CheckpointError(f"{path}: is empty, not a checkpoint")
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise CheckpointError(f"{path}: not a torch checkpoint (it starts with {head!r})")
    try:
        with warnings.catch_warnings():  # torch warns about a foreign pickle protocol: the error says enough
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load: the file needs arbitrary unpickling, which can run code "
                              f"(a checkpoint holds tensors, numbers, strings, lists and dicts; "
                              f"{one_line(e)[:100]})") from None
    except Exception as e:  # noqa: BLE001 -- zip, EOF and format errors of a damaged file
        raise CheckpointError(f"{path}: not a readable checkpoint ({one_line(e)[:160]})") from None


def _equal(a, b) -> bool:
    try:
        return bool(a == b) and type(a) is not Tensor
    except Exception:  # noqa: BLE001 -- a value that does not compare (a tensor in a hostile config)
        return False


def _complaint(path: Path) -> Callable[[str], NoReturn]:
    """``bad(msg)``: raise a :class:`CheckpointError` naming ``path``."""
    def bad(msg: str) -> NoReturn:
        raise CheckpointError(f"{path}: {msg}")
    return bad


def _save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, cfg: TrainConfig, *,
                     epoch: int, step: int, best_acc: float, running: dict | None, records: list[dict]) -> None:
    """Write a checkpoint atomically: at ``epoch`` (finished epochs) and ``step`` (steps of the
    next one done, their sums in ``running``), with the RNG states of this moment."""
    atomic_torch_save(_checkpoint_safe({
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step,
        "best_acc": best_acc, "running": running, "rng": _rng_state(), "config": cfg.to_dict(),
        "sepconv_config": getattr(model, "sepconv_config", None), "history": list(records),
    }), path)


def _check_checkpoint(state, path: Path, cfg: TrainConfig, steps_per_epoch: int, loss_terms) -> dict:
    """Check a checkpoint's entries against the run before anything is built; returns what the
    run resumes from (``epoch``, ``step``, ``best_acc``, ``running``, ``records``, ``rng``).
    :class:`CheckpointError` naming ``path`` and the entry otherwise."""
    bad = _complaint(path)
    _check_entries(state, bad)
    _check_same_run(state["config"], cfg, bad)
    epoch, step = state["epoch"], state["step"]
    if epoch < 0:
        bad(f"'epoch' is {epoch}: not a number of finished epochs")
    if epoch > cfg.epochs or (epoch == cfg.epochs and step > 0):
        bad(f"the checkpoint is at epoch {epoch}{f' step {step}' if step else ''}, past --epochs {cfg.epochs} "
            f"(resume with --epochs {epoch + (step > 0)} or more)")
    if not 0 <= step <= steps_per_epoch:
        bad(f"'step' is {step}, outside the {steps_per_epoch} steps of an epoch (0..{steps_per_epoch})")
    best = state["best_acc"]
    if not (math.isfinite(best) and -1 <= best <= 1):
        bad(f"'best_acc' is {best!r}, not an accuracy")
    running = _resumed_running(state.get("running"), step, loss_terms, bad)
    records = _resumed_history(state.get("history"), epoch, bad)
    rng = _rng_native(state["rng"], bad)
    return {"epoch": epoch, "step": step, "best_acc": float(best), "running": running, "records": records,
            "rng": rng}


def _check_entries(state, bad: Callable[[str], NoReturn]) -> None:
    """Every entry of :data:`_CHECKPOINT_ENTRIES` is there, of its type."""
    if not isinstance(state, dict):
        bad(f"not a training checkpoint (it holds a {type(state).__name__}, not a dict)")
    missing = [k for k in _CHECKPOINT_ENTRIES if k not in state]
    if missing:
        bad(f"not a complete training checkpoint: no {', '.join(map(repr, missing))} "
            f"entr{'y' if len(missing) == 1 else 'ies'}")
    for key, (types, what) in _CHECKPOINT_ENTRIES.items():
        v = state[key]
        if isinstance(v, bool) or not isinstance(v, types):
            bad(f"{key!r} must be {what}, got {type(v).__name__} {v!r:.40}")


def _check_same_run(saved: dict, cfg: TrainConfig, bad: Callable[[str], NoReturn]) -> None:
    """The checkpoint's config equals ``cfg`` but for :data:`RESUME_MAY_CHANGE`."""
    try:
        old = TrainConfig.from_dict(saved)
    except (TypeError, ValueError) as e:
        bad(f"'config' is malformed ({one_line(e)[:120]})")
    for f in dataclasses.fields(TrainConfig):
        a, b = getattr(old, f.name), getattr(cfg, f.name)
        if f.name not in RESUME_MAY_CHANGE and not _equal(a, b):
            bad(f"the checkpoint was trained with {f.name}={a!r:.60}, not {b!r:.60} (--resume continues the "
                f"same run: only {', '.join(sorted(RESUME_MAY_CHANGE))} may change; --force starts afresh)")


def _resumed_running(running, step: int, loss_terms, bad: Callable[[str], NoReturn]) -> dict | None:
    """The sums of the first ``step`` steps of the epoch being resumed (``None`` at step 0)."""
    if step == 0:
        return None
    need = ("loss", "correct", "n", "time", "steps", *(f"loss_{k}" for k in loss_terms))
    if not (isinstance(running, dict) and all(
            isinstance(running.get(k), (int, float)) and not isinstance(running.get(k), bool)
            and math.isfinite(running[k]) and running[k] >= 0 for k in need)):
        bad(f"'running' (the sums of the epoch's first {step} steps) is missing or malformed")
    if running["steps"] != step:
        bad(f"'running' counts {running['steps']!r} steps, but 'step' is {step}")
    return {k: running[k] for k in need}


def _resumed_history(records, epoch: int, bad: Callable[[str], NoReturn]) -> list[dict] | None:
    """The metrics of epochs 1..``epoch`` the checkpoint holds (``None``: an older checkpoint
    without them)."""
    if records is not None:
        if not (isinstance(records, list) and len(records) == epoch
                and all(isinstance(r, dict) and r.get("epoch") == i + 1 for i, r in enumerate(records))):
            bad(f"'history' does not hold the metrics of epochs 1..{epoch}")
        try:
            json.dumps(records)
        except (TypeError, ValueError) as e:
            bad(f"'history' is not plain numbers and text ({one_line(e)[:80]})")
    return records


def _load_checkpoint(state: dict, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler, global_step: int) -> None:
    """Load the model, optimizer and scheduler states, each checked against what this run built;
    :class:`CheckpointError` naming the entry (and the key) that does not fit."""
    bad = _complaint(path)
    _load_model_state(state["model"], path, model, bad)
    _load_optimizer_state(state["optimizer"], model, optimizer, bad)
    _load_scheduler_state(state["scheduler"], scheduler, global_step, bad)


def _load_model_state(sd: dict, path: Path, model: nn.Module, bad: Callable[[str], NoReturn]) -> None:
    wrong = next((k for k, v in sd.items() if not (isinstance(k, str) and isinstance(v, Tensor))), None)
    if wrong is not None:
        bad(f"'model' entry {wrong!r:.60} is not a named tensor")
    try:
        load_weights_into(model, sd, source=f"{path}: 'model'")
        check_finite(model, f"{path}: 'model'")
    except (WeightsError, ConfigError) as e:
        raise CheckpointError(str(e)) from None


def _load_optimizer_state(opt: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
                          bad: Callable[[str], NoReturn]) -> None:
    if not (isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)):
        bad("'optimizer' is not an optimizer state dict (it needs 'state' and 'param_groups')")
    try:
        optimizer.load_state_dict(opt)
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError, AttributeError) as e:
        bad(f"'optimizer' does not fit this run's {type(optimizer).__name__} ({one_line(e)[:120]})")
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for key, v in group.items():
            if key != "params" and isinstance(v, float) and not math.isfinite(v):
                bad(f"'optimizer' has {key}={v}")
        for p in group["params"]:
            for key, v in optimizer.state.get(p, {}).items():
                if isinstance(v, Tensor):
                    if v.ndim and v.shape != p.shape:
                        bad(f"'optimizer' state {key!r} of {names.get(id(p), '?')} has shape {tuple(v.shape)}, "
                            f"the parameter {tuple(p.shape)}")
                    if v.is_floating_point() and not torch.isfinite(v).all():
                        bad(f"'optimizer' state {key!r} of {names.get(id(p), '?')} holds NaN or Inf")
                elif not (v is None or isinstance(v, (int, float))):
                    bad(f"'optimizer' state {key!r} of {names.get(id(p), '?')} is a {type(v).__name__}")


def _load_scheduler_state(sch: dict, scheduler, global_step: int, bad: Callable[[str], NoReturn]) -> None:
    own = scheduler.state_dict()
    unknown = [k for k in sch if k not in own]
    if unknown:
        bad(f"'scheduler' has an entry {unknown[0]!r:.60} a {type(scheduler).__name__} does not have")
    if sch.get("last_epoch") != global_step or isinstance(sch.get("last_epoch"), bool):
        bad(f"'scheduler' is at step {sch.get('last_epoch')!r:.40}, but the checkpoint's epoch and step make "
            f"step {global_step}")
    base = sch.get("base_lrs", own["base_lrs"])
    if not (isinstance(base, list) and len(base) == len(own["base_lrs"]) and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) and b >= 0 for b in base)):
        bad("'scheduler' base_lrs are not one finite learning rate per parameter group")
    if any(fn is not None for fn in sch.get("lr_lambdas", [])):
        bad("'scheduler' lr_lambdas must be empty (the schedule comes from the config)")
    for k, v in sch.items():
        if k not in ("base_lrs", "lr_lambdas", "_last_lr") and type(v) is not type(own[k]) and not (
                isinstance(v, (int, float)) and isinstance(own[k], (int, float))):
            bad(f"'scheduler' {k} is a {type(v).__name__}, not a {type(own[k]).__name__}")
    scheduler.load_state_dict(sch)
