"""Expert storage formats (formats.py), group-wise quantization and bit packing
(quantize.py), matmul kernels on quantized weights (kernels.py, csrc/qmm.c), the quantized
expert formats (experts.py) and int8 linear layers for non-expert weights (linear.py).

Importing the package registers the quantized formats in `formats.FORMATS`.
"""

from . import experts as _experts
from . import formats as _formats
from . import mxfp4 as _mxfp4

for _fmt in _experts.default_formats():
    _formats.register(_fmt)
_formats.register(_mxfp4.FORMAT)
