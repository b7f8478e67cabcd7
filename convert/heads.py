"""A new classifier head: the common transfer-learning step, a pretrained model made to predict N classes.

timm models replace their own head (``reset_classifier``). torchvision models, and
models built like them, keep it under a known attribute: ``fc`` (ResNet, Inception),
``classifier`` (its last layer: VGG, MobileNet, EfficientNet, ConvNeXt, SqueezeNet's
1x1 conv), ``head``/``heads.head`` (Swin, ViT); Inception and GoogLeNet's auxiliary
heads are replaced too. The new layers take the old ones' input width and are
initialised from a seed, so the same seed gives the same head. A checkpoint records
the class count, and loading puts an identical (then overwritten) head in place.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UserError
from .surgery import get_module, set_module

#: Attributes that hold the classifier of torchvision-style models, in the order they are tried.
HEAD_ATTRS = ("fc", "classifier", "head", "heads", "last_linear")
#: Auxiliary classifiers that also predict the classes (torchvision Inception v3, GoogLeNet).
AUX_HEADS = ("AuxLogits.fc", "aux1.fc2", "aux2.fc2")


class HeadError(UserError):
    """The model's classifier head cannot be found, or the class count is not valid."""


def find_heads(model: nn.Module) -> list[str]:
    """Qualified names of the layers that output the class scores (the main head first), or ``[]``."""
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):  # timm
        try:
            classifier = get_classifier()
        except TypeError:
            classifier = None
        if isinstance(classifier, nn.Module):
            names = [n for n, m in model.named_modules() if m is classifier and _is_output_layer(m)]
            if names:
                return names[:1]
    heads: list[str] = []
    for attr in HEAD_ATTRS:
        holder = getattr(model, attr, None)
        if isinstance(holder, nn.Module):
            last = _last_output_layer(holder, attr)
            if last is not None:
                heads.append(last)
                break
    for name in AUX_HEADS:
        try:
            if heads and _is_output_layer(get_module(model, name)):
                heads.append(name)
        except AttributeError:
            continue
    return heads


def _is_output_layer(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1))


def _last_output_layer(module: nn.Module, name: str) -> str | None:
    """The last Linear (or 1x1 conv) in ``module``, named from the model's root."""
    if _is_output_layer(module):
        return name
    found = [n for n, m in module.named_modules() if n and _is_output_layer(m)]
    return f"{name}.{found[-1]}" if found else None


def replace_head(model: nn.Module, num_classes: int, seed: int = 0) -> list[str]:
    """Give ``model`` (in place) a new classifier head for ``num_classes``; return the replaced layers' names.

    The new weights come from ``seed`` (the global random state is left as it was).
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise HeadError(f"the number of classes must be a positive integer, got {num_classes!r}")
    reset = getattr(model, "reset_classifier", None)
    names = find_heads(model)
    if not callable(reset) and not names:
        raise HeadError(
            f"cannot find the classifier head of this {type(model).__name__} (no reset_classifier method, and none "
            f"of its attributes {', '.join(HEAD_ATTRS)} holds a Linear layer); replace the head before converting"
        )
    training = model.training
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if callable(reset):  # timm, and models that follow its interface
            reset(num_classes)
        else:
            for name in names:
                set_module(model, name, _new_layer(get_module(model, name), num_classes))
    model.train(training)  # the new layers in the model's mode (an eval model keeps no dropout on)
    return find_heads(model)


def _new_layer(old: nn.Module, num_classes: int) -> nn.Module:
    """A layer like ``old`` (same input, bias, device and dtype) with ``num_classes`` outputs."""
    weight = old.weight
    factory = {"device": weight.device, "dtype": weight.dtype}
    if isinstance(old, nn.Linear):
        return nn.Linear(old.in_features, num_classes, bias=old.bias is not None, **factory)
    return nn.Conv2d(old.in_channels, num_classes, 1, bias=old.bias is not None, **factory)


def copy_head(target: nn.Module, source: nn.Module, names: list[str]) -> None:
    """Copy the head layers ``names`` of ``source`` into ``target`` (same shapes), e.g. to compare the features."""
    for name in names:
        get_module(target, name).load_state_dict(get_module(source, name).state_dict())
