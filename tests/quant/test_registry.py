"""The format registry: what importing edgemoe.quant registers, name parsing, errors."""

from __future__ import annotations

import pytest

from edgemoe.errors import EdgeMoEError
from edgemoe.quant import formats, registry
from edgemoe.quant.experts import GroupwiseFormat, Int8Format
from edgemoe.quant.mxfp4 import MXFP4Format


def test_importing_the_package_registers_every_format_in_order():
    # get_format adds the names it parses after these, so only the first ones are fixed
    assert list(registry.FORMATS)[:11] == [
        "bf16", "fp16", "fp32", "int8",
        "int4", "int4-asym", "int3", "int3-asym", "int2", "int2-asym",
        "mxfp4",
    ]
    assert isinstance(registry.FORMATS["int8"], Int8Format)
    assert isinstance(registry.FORMATS["mxfp4"], MXFP4Format)
    assert registry.FORMATS["fp16"] is formats.FLOAT_FORMATS[1]


def test_formats_reexports_the_registry():
    assert formats.FORMATS is registry.FORMATS
    assert formats.get_format is registry.get_format and formats.register is registry.register


def test_parse_format():
    assert registry.parse_format("fp16") is registry.FORMATS["fp16"]
    assert registry.parse_format("mxfp4") is registry.FORMATS["mxfp4"]
    fmt = registry.parse_format("int4-asym-g128")
    assert isinstance(fmt, GroupwiseFormat) and fmt.name == "int4-asym-g128"
    assert registry.parse_format("int5") is None and registry.parse_format("bf8") is None
    with pytest.raises(ValueError):
        registry.parse_format("int4-g100")  # not a multiple of 64


def test_get_format_caches_parsed_names_and_reports_unknown_ones():
    fmt = registry.get_format("int2-asym-g256")
    assert registry.get_format("int2-asym-g256") is fmt is registry.FORMATS["int2-asym-g256"]
    with pytest.raises(EdgeMoEError, match="unknown expert format 'nope'.*known: bf16"):
        registry.get_format("nope")
    with pytest.raises(EdgeMoEError, match="expert format 'int3-g32'"):
        registry.get_format("int3-g32")
