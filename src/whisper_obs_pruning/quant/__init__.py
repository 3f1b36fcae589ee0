"""OBS-family weight quantization (RTN, GPTQ) from the cached Hessians, and a small checkpoint."""

from .checkpoint import (
    QuantCheckpointError,
    load_quantized,
    load_quantized_state_dict,
    save_quantized,
)
from .gptq import quantize_gptq
from .grid import (
    QuantError,
    QuantResult,
    QuantSpec,
    compute_grid,
    dequantize,
    layer_loss,
    parse_scheme,
)
from .rtn import quantize_rtn

__all__ = [
    "QuantCheckpointError",
    "load_quantized",
    "load_quantized_state_dict",
    "save_quantized",
    "QuantError",
    "QuantResult",
    "QuantSpec",
    "compute_grid",
    "dequantize",
    "layer_loss",
    "parse_scheme",
    "quantize_gptq",
    "quantize_rtn",
]
