"""Expert format registry: format names, as recorded in store manifests ("bf16", "int8",
"int4-asym-g128", "mxfp4", ...), to `Format` objects.

Owns the table of registered formats and the name grammars that make a format for a name
outside the table (e.g. "int3-asym-g128", parsed by experts.py's grammar). It defines no
format itself: the package's __init__ registers those of formats.py, experts.py and
mxfp4.py, so the table is complete once anything under edgemoe.quant is imported.

A leaf of edgemoe.quant: the format modules import it, it imports none of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..errors import EdgeMoEError

if TYPE_CHECKING:
    from .formats import Format

# A name grammar: a format for a name it matches, None for a name it does not match,
# ValueError for a name it matches with unusable parameters.
Parser = Callable[[str], "Format | None"]

FORMATS: dict[str, Format] = {}
_PARSERS: list[Parser] = []


def register(fmt: Format) -> Format:
    """Add (or replace) the format under its name."""
    FORMATS[fmt.name] = fmt
    return fmt


def register_parser(parser: Parser) -> Parser:
    """Add a name grammar that `parse_format` tries for names not in the table."""
    _PARSERS.append(parser)
    return parser


def parse_format(name: str) -> Format | None:
    """The registered format `name`, else one the first matching grammar makes, else
    None. Raises ValueError for a name a grammar matches with unusable parameters."""
    if name in FORMATS:
        return FORMATS[name]
    for parser in _PARSERS:
        fmt = parser(name)
        if fmt is not None:
            return fmt
    return None


def get_format(name: str) -> Format:
    """The format recorded under `name` in a manifest. Besides the registered names this
    accepts any name of a registered grammar (e.g. "int3-asym-g128", see experts.py)."""
    if name not in FORMATS:
        try:
            fmt = parse_format(name)
        except ValueError as e:
            raise EdgeMoEError(f"expert format {name!r}: {e}") from None
        if fmt is None:
            raise EdgeMoEError(f"unknown expert format {name!r} (known: {', '.join(sorted(FORMATS))})")
        # A non-canonical spelling ("int4-g64") maps onto the registered canonical format.
        return FORMATS.setdefault(fmt.name, fmt)
    return FORMATS[name]
