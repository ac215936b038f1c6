"""The op-semantics registry (see `core.py`); importing the package registers every family."""

from npu_dit.passes.ops import creation, nn, pointwise, reductions, views  # noqa: F401 - registrations
from npu_dit.passes.ops.core import Call, Semantics, register, rule_for, semantics
from npu_dit.passes.ops.normalize import normalize

__all__ = ["Call", "Semantics", "normalize", "register", "rule_for", "semantics"]
