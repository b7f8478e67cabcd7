"""The table of forms: every way the core (or a kind) can compute a dynamic convolution, with what it can do.

A form is one record: its name, the function that computes it (``None`` for a form a
kind computes itself and only records, such as ODConv's rescaled im2col) and its
capabilities. ``STRATEGIES``, ``EXPORTABLE_STRATEGIES``, :func:`dynconv.strategy_scope`,
the choice (:mod:`dynconv.core.rules`), the layers' ``strategy`` attribute and the ONNX
metadata all read this one table, so a form registered here is seen by all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

#: ``fn(x, weight, routing, bias, geom[, terms]) -> out``; see :mod:`dynconv.core.strategies`.
FormFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Form:
    """One way to compute a batch of per-sample convolutions, and what it can do."""

    name: str
    #: The core function, or ``None`` for a kind's own form (computed by the layer, recorded only).
    compute: FormFn | None
    #: Forms each sample's kernel (costs a kernel-sized tensor per sample; takes kernel terms if ``takes_terms``).
    per_sample_kernels: bool
    #: Its graph does not depend on the batch size: an export or compile with a dynamic batch can use it.
    batch_agnostic: bool
    #: Traces into standard ops (ONNX, torch.export) at a fixed batch.
    exportable: bool = True
    #: Computes 1x1 kernels only.
    pointwise_only: bool = False
    #: Computes a batch of one only.
    batch_one_only: bool = False
    #: Takes :class:`~dynconv.core.kernels.KernelTerms` (per-sample factors and offset on the kernel).
    takes_terms: bool = True
    #: The kind that computes this form itself (``compute is None``), or ``None`` for a core form.
    kind: str | None = None

    def __post_init__(self) -> None:
        if (self.compute is None) == (self.kind is None):
            raise ValueError(f"form {self.name!r}: a core form has a compute function, a kind's own form a kind")
        if self.takes_terms and not self.per_sample_kernels:
            raise ValueError(f"form {self.name!r}: kernel terms need per-sample kernels")


FORMS: dict[str, Form] = {}


def register_form(form: Form) -> Form:
    """Add ``form`` to the table; a name is registered once."""
    if form.name in FORMS:
        raise ValueError(f"a form named {form.name!r} is already registered")
    FORMS[form.name] = form
    return form


def core_forms() -> Iterator[Form]:
    """The forms the core computes (the ones a call can be given as ``strategy=``)."""
    return (f for f in FORMS.values() if f.compute is not None)


class _Strategies(Mapping[str, FormFn]):
    """``name -> compute function`` of every core form, read live from the table."""

    def __getitem__(self, name: str) -> FormFn:
        form = FORMS[name]
        if form.compute is None:
            raise KeyError(name)
        return form.compute

    def __iter__(self) -> Iterator[str]:
        return (f.name for f in core_forms())

    def __len__(self) -> int:
        return sum(1 for _ in core_forms())

    def __repr__(self) -> str:
        return f"STRATEGIES({list(self)})"


class _Exportable(Sequence[str]):
    """Names of the core forms whose graph serves any batch size, read live from the table."""

    def _names(self) -> tuple[str, ...]:
        return tuple(f.name for f in core_forms() if f.batch_agnostic and f.exportable)

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __eq__(self, other: object) -> bool:
        return tuple(self) == tuple(other) if isinstance(other, Sequence) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._names())

    def __repr__(self) -> str:
        return repr(self._names())


#: Every core form by name (a live view of :data:`FORMS`).
STRATEGIES: Mapping[str, FormFn] = _Strategies()
#: Core forms whose graph does not depend on the batch size: inside
#: ``strategy_scope(*EXPORTABLE_STRATEGIES)`` an ONNX export keeps the batch axis dynamic.
EXPORTABLE_STRATEGIES: Sequence[str] = _Exportable()
