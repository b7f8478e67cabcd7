"""The core every dynamic layer calls: a table of forms, the rules that pick one, and ``run``.

- :mod:`~dynconv.core.forms`: the table (each form, its capabilities); ``STRATEGIES``.
- :mod:`~dynconv.core.kernels`: the shared pieces (mixing kernels and biases, padding, 1x1 matmul).
- :mod:`~dynconv.core.strategies`: the six core forms, registered in the table.
- :mod:`~dynconv.core.rules`: every ordering rule (per shape, export, compile, the kinds' paths).
- :mod:`~dynconv.core.scope`: ``strategy_scope`` and the record of what ran.
- :mod:`~dynconv.core.run`: pick, record, compute; called by the eager path and the opaque op.
- :mod:`~dynconv.core.opaque`: the core as one ``torch.library`` op for ``torch.compile``.

The public entry is :func:`dynconv.functional.dynamic_conv2d`, which checks a call and hands it here.
"""

from . import strategies as _strategies  # noqa: F401  (registers the core forms)
from .forms import EXPORTABLE_STRATEGIES, FORMS, STRATEGIES, Form, register_form
from .kernels import KernelTerms
from .run import run, select_strategy
from .scope import record_strategies, strategy_scope

__all__ = [
    "EXPORTABLE_STRATEGIES",
    "FORMS",
    "STRATEGIES",
    "Form",
    "KernelTerms",
    "record_strategies",
    "register_form",
    "run",
    "select_strategy",
    "strategy_scope",
]
