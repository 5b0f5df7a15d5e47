"""The reader's crc32 (ISA-L's where the optional isal package is installed, else zlib's)
gives exactly the values the converter wrote with zlib.crc32: the on-disk format does not
depend on which one a machine has."""

from __future__ import annotations

import random
import zlib

import pytest

from edgemoe.store import reader


@pytest.mark.parametrize("n", [0, 1, 63, 4096, 100_003, 3 << 20])
def test_reader_crc32_matches_zlib(n):
    data = random.Random(n).randbytes(n)
    view = memoryview(data)
    assert reader.crc32(view) == zlib.crc32(data)
    assert reader.crc32(view[n // 3 :]) == zlib.crc32(data[n // 3 :])  # a slice, as verify() passes


def test_isal_crc32_matches_zlib_where_installed():
    isal_zlib = pytest.importorskip("isal.isal_zlib")
    assert reader.CRC32 == "isal"
    for seed in range(20):
        rng = random.Random(seed)
        data = rng.randbytes(rng.randrange(1, 1 << 20))
        assert isal_zlib.crc32(data) == zlib.crc32(data)
