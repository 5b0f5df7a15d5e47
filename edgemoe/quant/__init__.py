"""Quantized expert storage and compute.

Modules, each importing only those above it (tests/test_imports.py checks there is no
cycle, function-level imports included):

    native.py    the C library (csrc/): build on first use, one object per instruction set,
                 run-time dispatch, cache, ctypes bindings
    registry.py  format names -> Format objects, and the name grammars
    quantize.py  group-wise quantization and bit packing (C fast path via native)
    kernels.py   matmul on quantized weights: picks the C kernel or a torch fallback
    formats.py   the Format interface, the float formats, the expert bias layout
    experts.py   int8 and 2/3/4-bit group-wise expert formats and their name grammar
    mxfp4.py     the MXFP4 expert format (gpt-oss) and its kernel
    linear.py    Int8Linear, Int4Linear for non-expert weights; resident.py: their storage

Importing the package registers every format and name grammar in the registry, in the
order of the loop below (the order of the table).
"""

from . import experts as _experts
from . import formats as _formats
from . import mxfp4 as _mxfp4
from . import registry as _registry

for _fmt in (*_formats.FLOAT_FORMATS, *_experts.default_formats(), _mxfp4.FORMAT):
    _registry.register(_fmt)
_registry.register_parser(_experts.parse_format)
