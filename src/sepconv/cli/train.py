"""``sepconv train``: train a classifier (single process, or DDP under torchrun)."""

from __future__ import annotations

import argparse

from ..data import list_datasets
from ..layers import CONV_KINDS
from ..losses import LOSS_ALIASES, LOSSES, loss_names
from ..normalize import MODES as SN_MODES
from ..normalize import normalize_methods
from ..runtime import tune_allocator
from ..train import OPTIMIZERS, SCHEDULES, TrainConfig, train
from .args import add_trust_code, model_arg, nonneg_float, number, positive_float, positive_int, unit_float

alpha_arg = number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
folds_arg = number(int, lambda v: v == 0 or v >= 2, "0 or an integer >= 2")
nonneg_int = number(int, lambda v: v >= 0, "an integer >= 0")


def add(sub) -> argparse.ArgumentParser:
    d = TrainConfig()
    p = sub.add_parser("train", help="train a model (single process, or under torchrun with DDP)",
                       description="Train a classifier. Under `torchrun --nproc_per_node N -m sepconv train ...` "
                                   "it runs DistributedDataParallel (gloo on CPU, nccl on CUDA).")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model, help=f"registry name (see `sepconv models`; default {d.model})")
    g.add_argument("--conv", default=d.conv, choices=CONV_KINDS,
                   help="convolution flavour of the model's spatial convs")
    g.add_argument("--width", type=positive_float, default=d.width, help="channel multiplier")
    g.add_argument("--model-arg", type=model_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="extra constructor argument (repeatable)")
    g.add_argument("--init", metavar="DIR", help="start from a saved model directory (fine-tuning)")
    add_trust_code(g, "--init DIR's")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data,
                   help=f"dataset, one of {', '.join(list_datasets())} (default {d.data}: bundled)")
    g.add_argument("--data-dir", metavar="DIR", help="directory holding the dataset's files")
    g.add_argument("--image-size", type=positive_int, help="resize images to this size (default: the dataset's)")
    g.add_argument("--train-images", type=positive_int, metavar="N",
                   help="train on the first N images of the train split only (smoke tests; default: all)")
    g.add_argument("--folds", type=folds_arg, default=d.folds, metavar="K",
                   help="stratified K-fold cross-validation: pool the dataset's train and test splits, test on "
                        "fold --fold of K and train on the others (default 0: the dataset's own split)")
    g.add_argument("--fold", type=nonneg_int, default=d.fold, metavar="I",
                   help="with --folds K: the test fold, 0..K-1 (default 0)")
    g.add_argument("--no-augment", dest="augment", action="store_false", help="no random crop / flip")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=positive_int, default=d.epochs)
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="global batch size")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    g.add_argument("--lr", type=positive_float, default=d.lr)
    g.add_argument("--momentum", type=unit_float, default=d.momentum)
    g.add_argument("--no-nesterov", dest="nesterov", action="store_false", help="plain momentum for SGD")
    g.add_argument("--weight-decay", type=nonneg_float, default=d.weight_decay,
                   help="decay of weights (biases and norm parameters are not decayed)")
    g.add_argument("--schedule", choices=SCHEDULES, default=d.schedule)
    g.add_argument("--milestones", type=positive_int, nargs="+", default=[], metavar="EPOCH",
                   help="epochs at which --schedule step multiplies the lr by --gamma")
    g.add_argument("--gamma", type=positive_float, default=d.gamma)
    g.add_argument("--warmup-epochs", type=nonneg_float, default=d.warmup_epochs)
    g.add_argument("--loss", choices=loss_names(aliases=True), default=d.loss,
                   help="training loss: " + "; ".join(f"{n}: {s.summary}" for n, s in LOSSES.items())
                        + "".join(f"; {a} = {n}" for a, n in LOSS_ALIASES.items()) + f" (default {d.loss})")
    g.add_argument("--label-smoothing", type=unit_float, default=d.label_smoothing, help="--loss ce only")
    g.add_argument("--logit-scale", type=positive_float, default=d.logit_scale, metavar="S",
                   help="--loss ce: train on cross_entropy(S * logits) / S (default 1); S ~ 10 lets a spectrally "
                        "normalized network reach the margins a certificate needs")
    g.add_argument("--margin", type=positive_float, default=d.margin, metavar="M",
                   help=f"--loss hinge, hkr: the logit margin asked of every training image (default {d.margin:g}). "
                        "A test image with margin M is certified at pixel-l2 radius M * min(std) / (sqrt(2) L), L "
                        "the lipschitz_bound --certify logs: for a radius EPS, M = sqrt(2) * L * EPS / min(std)")
    g.add_argument("--hkr-alpha", type=alpha_arg, default=d.hkr_alpha, metavar="A",
                   help=f"--loss hkr: A * hinge - (1 - A) * Kantorovich-Rubinstein, A in (0, 1] (default "
                        f"{d.hkr_alpha:g})")
    g.add_argument("--bsconv-alpha", type=nonneg_float, default=None,
                   help="weight of the BSConv-S orthonormal penalty (default 0.1 when the model has "
                        "BSConv-S parts, else 0)")
    g = p.add_argument_group("spectral normalization and certification")
    g.add_argument("--sn", choices=normalize_methods(), default=None,
                   help="spectrally normalize every layer by this method (dsc: depthwise FFT + pointwise "
                        "matrix norms, Runkel et al.; reshape: torch's, for comparison; see sepconv.normalize)")
    g.add_argument("--sn-target", type=positive_float, default=d.sn_target, metavar="C",
                   help="largest allowed norm per layer (default 1)")
    g.add_argument("--sn-mode", choices=SN_MODES, default=d.sn_mode,
                   help="clip: shrink layers above the target (default); scale: always divide by the norm")
    g.add_argument("--sn-batchnorm", action="store_true", help="also bound each BatchNorm's Lipschitz constant")
    g.add_argument("--ff-beta", type=nonneg_float, default=d.ff_beta, metavar="B",
                   help="add B * (sum of the convs' Fantastic Four bounds) to the loss (Singla & Feizi)")
    g.add_argument("--curvature-beta", type=nonneg_float, default=d.curvature_beta, metavar="B",
                   help="add B * log(the network's certified curvature bound from Fantastic Four norms) to the "
                        "loss (Singla & Feizi; smooth activations, e.g. --model-arg act=elu)")
    g.add_argument("--certify", type=nonneg_float, nargs="+", default=[], metavar="EPS",
                   help="after each epoch, log the network Lipschitz bound and the certified accuracy "
                        "at these pixel-l2 radii (images scaled to [0, 1], before the data's normalization)")
    _add_run_args(p.add_argument_group("run"), d)
    return p


def _add_run_args(g, d: TrainConfig) -> None:
    """The ``run`` group of ``sepconv train``: where it writes, resuming, seed and device."""
    g.add_argument("--out", metavar="DIR", help="output directory (default runs/MODEL-DATA)")
    g.add_argument("--resume", action="store_true",
                   help="continue from OUT/last.pt; the settings must be the checkpoint's, except --epochs (may "
                        "grow), --out, --data-dir, --device, --no-channels-last and --certify")
    g.add_argument("--force", action="store_true",
                   help="start afresh in an OUT that holds another run (its checkpoints, metrics and model are "
                        "removed once every check has passed); without it such an OUT is refused")
    g.add_argument("--stop-after", type=positive_int, metavar="N",
                   help="stop this invocation after N epochs (continue later with --resume)")
    g.add_argument("--seed", type=int, default=d.seed,
                   help="any integer (generators take it modulo 2**64: seeds 2**64 apart give the same run)")
    g.add_argument("--device", default=d.device, help="cpu (default), cuda, cuda:N or auto")
    g.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (the per-epoch summary lines stay)")


def train_config(args) -> TrainConfig:
    alpha = args.bsconv_alpha
    if alpha is None:
        alpha = 0.1 if args.conv == "bsconv_s" else 0.0
    return TrainConfig(
        model=args.model, conv=args.conv, width=args.width, model_kwargs=dict(args.model_arg),
        init=args.init, data=args.data, data_dir=args.data_dir, image_size=args.image_size,
        train_images=args.train_images, folds=args.folds, fold=args.fold,
        augment=args.augment, epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer,
        lr=args.lr, momentum=args.momentum, nesterov=args.nesterov, weight_decay=args.weight_decay,
        schedule=args.schedule, milestones=tuple(args.milestones), gamma=args.gamma,
        warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
        loss=args.loss, logit_scale=args.logit_scale, margin=args.margin, hkr_alpha=args.hkr_alpha,
        channels_last=args.channels_last,
        seed=args.seed, device=args.device, bsconv_alpha=alpha,
        sn=args.sn, sn_target=args.sn_target, sn_mode=args.sn_mode, sn_batchnorm=args.sn_batchnorm,
        ff_beta=args.ff_beta, curvature_beta=args.curvature_beta, certify=tuple(args.certify),
        out=args.out or f"runs/{args.model if not args.init else 'init'}-{args.data}",
    )


def run(args) -> int:
    cfg = train_config(args)
    tune_allocator()  # freed step buffers stay mapped (see sepconv.runtime)
    res = train(cfg, resume=args.resume, progress=args.progress, stop_after_epochs=args.stop_after, log=True,
                force=args.force, trust_code=args.trust_code)
    if res.history and res.is_main:
        print(saved_line(res, cfg.epochs))
    return 0


def saved_line(res, epochs: int) -> str:
    """What ``model/`` holds -- the last epoch's model -- and where the best epoch's is."""
    best = f" at epoch {res.best_epoch}" if res.best_epoch is not None else ""
    last = f", test accuracy {res.last_acc:.4f}" if isinstance(res.last_acc, float) else ""
    return (f"best test accuracy {res.best_acc:.4f}{best}; model saved to {res.out / 'model'}: the last epoch's "
            f"({res.epochs}/{epochs}{last}); the best epoch's checkpoint is {res.out / 'best.pt'}")
