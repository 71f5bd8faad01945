"""The safetensors format as permgraph reads and writes it: dtype codes, item sizes, and the
file names of a Hugging Face checkpoint folder (shared by `permgraph.checkpoint` and
`permgraph.writer`)."""

from __future__ import annotations

import torch

__all__ = ["SAFE_INDEX", "TORCH_INDEX", "WEIGHT_SUFFIXES", "DTYPE_CODES", "itemsize"]

SAFE_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
#: Files of a checkpoint folder that hold weights (not copied next to re-written weights).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")

#: torch dtype -> safetensors dtype code.
DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.complex64: "C64",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        DTYPE_CODES[getattr(torch, _name)] = _code


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()
