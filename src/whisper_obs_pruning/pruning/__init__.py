"""Model-level pruning: choose targets, allocate sparsity, apply a method (one-shot or sequential).

Names are loaded lazily so that ``pruning.targets`` (target selection, measured sparsity) can be
imported by evaluation and calibration without importing the methods: their DVC stages must not
depend on the methods' code.
"""

from importlib import import_module

_EXPORTS = {
    "ALLOCATIONS": "allocation",
    "HESSIAN_ALLOCATIONS": "allocation",
    "choose_grid_sparsities": "allocation",
    "obs_loss_curves": "allocation",
    "allocate_sparsity": "allocation",
    "saliency": "allocation",
    "prune_layers": "apply",
    "DEFAULT_EXCLUDE": "targets",
    "select_targets": "targets",
    "weight_sparsity": "targets",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
