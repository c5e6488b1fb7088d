"""Small helpers shared by the surgery code: module paths and parameter counts."""

from torch import nn

from .modeling.layers_rmtkd import ModulePathError, get_submodule, set_submodule

__all__ = ["ModulePathError", "count_parameters", "get_submodule", "set_submodule"]


def count_parameters(*modules: nn.Module) -> int:
    """Number of distinct parameter elements in ``modules`` (a tensor shared between them counts once).

    Args:
        modules: any number of modules.

    Returns:
        The total ``numel`` of their unique parameters.
    """
    unique = {id(p): p for module in modules for p in module.parameters()}
    return sum(p.numel() for p in unique.values())
