"""Model transforms that change how a network computes, not what it computes (in eval mode).

* :func:`bake_parametrizations` -- a spectrally normalized or orthogonal layer keeps its weight
  as a ``torch.nn.utils.parametrize`` parametrization (a normalizer recomputed at every forward
  pass); baking stores the parametrized weight itself, so a deployed model does no spectral
  work at all.
* :func:`fold_batchnorm` -- an eval-mode BatchNorm right after a convolution (or linear layer)
  is an affine map per channel, folded into that layer's weight and bias (Ioffe & Szegedy
  2015; Jacob et al. 2018, Sect. 3.2).
* :func:`deployable` -- both, plus each module's own ``deploy_form`` (an equivalent module:
  ResNet's option-A shortcut as a fixed strided 1x1 conv, a separable block without its identity
  children, a multiplier-m or b-blueprint block's grouped conv as a multiplier-1 depthwise conv
  on copies or slices for PyTorch, as ``m`` or ``b`` summed branches for ONNX), on a copy in eval
  mode: what :func:`~sepconv.deploy.export_onnx` exports and :func:`~sepconv.deploy.measure_latency`
  times. The PyTorch forms help eager, NCHW most (its grouped-conv path is slow); the branches help
  ONNX Runtime, which fuses a conv with the add after it (BENCHMARKS.md, "Deploy forms against the
  modules as built").
"""

from __future__ import annotations

import copy

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import ConfigError, UnsupportedLayerError
from ..layers import _SeparableBlock
from ..probe import dry_forward, input_dtype

__all__ = ["bake_parametrizations", "deployable", "fold_batchnorm", "folded_affine"]

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def folded_affine(weight: Tensor, bias: Tensor | None, bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """Weight and bias of ``bn(layer(x))`` as one layer, for eval-mode BatchNorm (exact).

    BN in eval mode is ``y = gamma (z - mu) / sqrt(var + eps) + beta`` per output channel, so
    with ``s = gamma / sqrt(var + eps)``: ``W' = s W`` (row-wise) and ``b' = s (b - mu) + beta``
    (Jacob et al. 2018, "Quantization and training of neural networks...", Sect. 3.2). Computed
    in float64 and returned in the weight's dtype.
    """
    dt = torch.float64
    s = bn.running_var.to(dt).add(bn.eps).rsqrt()
    if bn.weight is not None:
        s = s * bn.weight.to(dt)
    b = torch.zeros_like(bn.running_mean, dtype=dt) if bias is None else bias.to(dt)
    b = (b - bn.running_mean.to(dt)) * s
    if bn.bias is not None:
        b = b + bn.bias.to(dt)
    w = weight.to(dt) * s.reshape(-1, *([1] * (weight.dim() - 1)))
    return w.to(weight.dtype), b.to(weight.dtype)


def bake_parametrizations(model: nn.Module) -> nn.Module:
    """Replace every ``torch.nn.utils.parametrize`` parametrization in ``model`` (in place) by the
    tensor it currently computes: a normalized layer becomes a plain layer with the normalized
    weight. Call it on a copy in eval mode (the value in train mode may differ, e.g. one more
    power-iteration step). Returns ``model``."""
    # not parametrize.remove_parametrizations: it deletes the properties from the module's class,
    # which a deep copy shares with the model it was copied from
    with torch.no_grad():
        for mod in list(model.modules()):
            if not parametrize.is_parametrized(mod):
                continue
            values = {}
            for name, plist in mod.parametrizations.items():
                t = getattr(mod, name).detach().clone()
                values[name] = nn.Parameter(t, plist.original.requires_grad) if isinstance(
                    plist.original, nn.Parameter) else t
            del mod._modules["parametrizations"]
            mod.__class__ = mod.__class__.__bases__[0]  # parametrize's subclass -> the layer's own class
            for name, t in values.items():
                if isinstance(t, nn.Parameter):
                    mod.register_parameter(name, t)
                else:
                    mod.register_buffer(name, t)
    return model


def _plain_norm(m: nn.Module) -> bool:
    """A BatchNorm computing the standard map (a subclass that only constrains its weight, as
    :class:`~sepconv.lipschitz.BoundedBatchNorm2d`, is one once baked)."""
    return isinstance(m, _NORMS) and type(m).forward is nn.modules.batchnorm._BatchNorm.forward


class _Tracer(torch.fx.Tracer):
    """fx's tracer, with every module that holds no BatchNorm kept as a leaf: nothing inside it can
    be folded, and its forward code (shape checks, control flow) need not be traceable."""

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return (super().is_leaf_module(m, qualified_name) or isinstance(m, _FOLDABLE + _NORMS)
                or not any(isinstance(c, _NORMS) for c in m.modules()))


def _trace(model: nn.Module) -> torch.fx.Graph:
    try:
        return _Tracer().trace(model)
    except Exception as e:  # fx raises many types (TraceError, TypeError, ...)
        raise UnsupportedLayerError(f"fold_batchnorm: {type(model).__name__} cannot be traced by torch.fx "
                                    f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None


def _output_layer(name: str, mod: nn.Module) -> str | None:
    """The name of the layer whose output is ``mod``'s output, if a BN after ``mod`` may fold into
    it: ``mod`` itself (a conv or linear layer), or the last conv of a separable block (its
    children run in order; :class:`~sepconv.layers.DepthwiseSeparableConv2d`, BSConv-U/S)."""
    if isinstance(mod, _FOLDABLE):
        return name
    last = getattr(mod, "last", None)
    children = list(mod.named_children())
    if (isinstance(last, str) and children and children[-1][0] == last and isinstance(children[-1][1], _FOLDABLE)
            and type(mod).forward is _SeparableBlock.forward):
        return f"{name}.{last}"
    return None


def fold_batchnorm(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every eval-mode BatchNorm that directly follows a conv or linear layer into it.

    The layers are found on the ``torch.fx`` graph: a ``BatchNorm`` whose input is the output
    of a ``Conv1d/2d/3d`` or ``Linear`` used by nothing else is folded into that layer
    (:func:`folded_affine`) and replaced by ``nn.Identity``; the model keeps its class, names and
    forward code. In a separable block with a BatchNorm between its depthwise and pointwise
    convs, each BatchNorm folds into the conv before it, so both parts are folded. A BatchNorm
    before a conv, or after a layer whose output is also used elsewhere, is left as it is (a
    fold there is not exact under zero padding). BatchNorms without running statistics are left
    too. Exact for the eval-mode model: the result is returned in eval mode, as a copy unless
    ``inplace``. Parametrized layers are baked first (:func:`bake_parametrizations`).
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"fold_batchnorm: model must be a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    bake_parametrizations(model)
    graph = _trace(model)
    modules = dict(model.named_modules())
    folds = []
    for node in graph.nodes:
        if node.op != "call_module" or not _plain_norm(modules.get(node.target)):
            continue
        bn = modules[node.target]
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if (bn.running_mean is None or not isinstance(src, torch.fx.Node) or src.op != "call_module"
                or len(src.users) != 1):
            continue
        target = _output_layer(src.target, modules[src.target])
        layer = modules.get(target)
        if layer is None or getattr(layer, "out_channels", getattr(layer, "out_features", None)) != bn.num_features:
            continue
        folds.append((target, node.target))
    with torch.no_grad():
        for layer_name, bn_name in folds:
            layer, bn = modules[layer_name], modules[bn_name]
            w, b = folded_affine(layer.weight, layer.bias, bn)
            layer.weight.copy_(w)
            if layer.bias is None:
                layer.bias = nn.Parameter(b)
            else:
                layer.bias.copy_(b)
            model.set_submodule(bn_name, nn.Identity())
    return model


def deployable(model: nn.Module, input_shape: tuple[int, ...] | None = None, for_onnx: bool = False) -> nn.Module:
    """A copy of ``model`` in eval mode, ready for a runtime: parametrizations baked, BatchNorms
    folded where :func:`fold_batchnorm` can (a model ``torch.fx`` cannot trace keeps its
    BatchNorms: runtimes fold Conv+BN themselves), and every module with a ``deploy_form(
    in_shape, for_onnx)`` method replaced by the module it returns (given one dry pass on ``input_shape``,
    ``(C, H, W)``, to learn its input shape): the forms for PyTorch, or with ``for_onnx`` those for an
    ONNX graph (:func:`~sepconv.deploy.export_onnx`). Same outputs as ``model.eval()`` up to rounding.
    :func:`~sepconv.deploy.choose_forms` goes one step further: each linear separable block as its
    deploy form or its dense conv, whichever is measured faster in the target runtime."""
    model = copy.deepcopy(model).eval()
    bake_parametrizations(model)
    try:
        fold_batchnorm(model, inplace=True)
    except UnsupportedLayerError:
        pass
    special = tuple({type(m) for m in model.modules() if callable(getattr(m, "deploy_form", None))})
    if special and input_shape is not None:
        run = dry_forward(model, input_shape, record=special, where="deployable")
        dtype, device = input_dtype(model)
        for name in sorted(run.inputs, key=lambda n: -n.count(".")):  # inner modules first
            mod, shape = run.inputs[name]
            form = mod.deploy_form(shape, for_onnx=for_onnx).to(dtype=dtype, device=device).eval()
            if name:
                model.set_submodule(name, form)
            else:  # the model is itself such a module (one block)
                model = form
    return model
