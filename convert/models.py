"""Building base models by name: torchvision, timm, or ``package.module:factory``.

A model built here carries a :class:`ModelSource` record (source, name, constructor
arguments) so a checkpoint can rebuild it later without pickling anything. Recipes name
their model with the same record.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from .errors import UserError

Source = Literal["torchvision", "timm", "custom"]
SOURCES: tuple[str, ...] = get_args(Source)
BASE_ATTR = "dynconv_base"


class ModelNotFoundError(UserError):
    """The model name is not in torchvision, timm, or importable as ``module:factory``."""


class DownloadError(UserError, RuntimeError):
    """Pretrained weights could not be downloaded (e.g. the machine is offline)."""


class ModelSource(BaseModel):
    """Where a model comes from: zoo, name and constructor arguments, enough to rebuild it.

    ``source`` may be left out in a recipe (it is then looked up by name); a model
    built or converted here always records it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Source | None = None
    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able record stored in checkpoints."""
        return self.model_dump()

    def build(self, *, pretrained: bool = False) -> nn.Module:
        """Build this architecture from its zoo (random weights unless ``pretrained``); custom models cannot be."""
        if self.source == "custom":
            raise UserError(f"{self.name} is a custom model: pass an instance of it")
        return build_model(self.name, self.source, pretrained=pretrained, **self.kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSource:
        """Read a stored record back; a bad one is a :class:`~convert.errors.UserError`."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problem = exc.errors()[0]
            where = ".".join(str(p) for p in problem["loc"])
            raise UserError(f"bad model record: {where}: {problem['msg']}") from None


def torchvision_models() -> list[str]:
    """torchvision's classification model names."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def timm_models(pattern: str = "") -> list[str]:
    import timm

    return sorted(timm.list_models(pattern or "*"))


def list_models(pattern: str | None = None) -> list[tuple[str, str]]:
    """``(source, name)`` of every buildable model whose name matches the glob ``pattern``."""
    pattern = pattern or "*"
    found = [("torchvision", n) for n in torchvision_models() if fnmatch.fnmatch(n, pattern)]
    found += [("timm", n) for n in timm_models(pattern)]
    return found


def resolve_source(name: str, source: str | None = None) -> str:
    """Which zoo ``name`` belongs to; torchvision wins when both have it (e.g. ``resnet18``)."""
    if source is not None:
        if source not in SOURCES:
            raise ModelNotFoundError(f"unknown model source {source!r}; choose from {', '.join(SOURCES)}")
        return source
    if ":" in name:
        return "custom"
    if name in torchvision_models():
        return "torchvision"
    import timm

    if timm.is_model(name):
        return "timm"
    names = list(dict.fromkeys(torchvision_models() + timm_models()))  # resnet18 is in both: list it once
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else " Run `dynconv models` to list the names."
    raise ModelNotFoundError(f"unknown model {name!r}: not a torchvision or timm model name.{hint}")


def _import_factory(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelNotFoundError(f"custom model {spec!r} must look like package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelNotFoundError(f"cannot import module {module_name!r} for model {spec!r}: {exc}") from None
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ModelNotFoundError(f"module {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ModelNotFoundError(f"{spec!r} is not callable")
    return factory


def build_model(name: str, source: str | None = None, *, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build ``name`` (random weights unless ``pretrained``) and tag it with its :class:`ModelSource`.

    ``pretrained`` downloads the zoo's default weights; without network access it
    raises a :class:`DownloadError` that says so and suggests loading a weights file.
    """
    source = resolve_source(name, source)
    if source == "custom":
        if pretrained:
            raise UserError("pretrained weights come from torchvision or timm; load a custom model's from a file")
        model = _import_factory(name)(**kwargs)
        if not isinstance(model, nn.Module):
            raise ModelNotFoundError(f"factory {name!r} returned {type(model).__name__}, not an nn.Module")
    elif source == "torchvision":
        import torchvision

        weights = "DEFAULT" if pretrained else None
        model = _download(lambda: torchvision.models.get_model(name, weights=weights, **kwargs), name, pretrained)
    else:
        import timm

        model = _download(lambda: timm.create_model(name, pretrained=pretrained, **kwargs), name, pretrained)
    tag_base(model, ModelSource(source=source, name=name, kwargs=dict(kwargs)))
    return model


def _download(build: Any, name: str, pretrained: bool) -> nn.Module:
    try:
        return build()
    except (OSError, RuntimeError, ValueError) as exc:
        if not pretrained:
            raise
        raise DownloadError(
            f"could not download pretrained weights for {name!r} ({type(exc).__name__}); this machine may be "
            "offline: save the weights to a file elsewhere and load them from it",
            cli_hint="--weights FILE",
        ) from exc


def tag_base(model: nn.Module, base: ModelSource) -> None:
    """Record where ``model`` came from (survives ``copy.deepcopy``)."""
    setattr(model, BASE_ATTR, base)
