"""A named pipe, directory or device where a model file is expected is refused with a clear
error; reading a pipe would otherwise block forever (inside libraries that cannot be
interrupted)."""

from __future__ import annotations

import os
import shutil

import pytest

import edgemoe
from edgemoe import assets
from edgemoe.errors import ModelLoadError

FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]


@pytest.mark.parametrize("kind", ["fifo", "directory"])
@pytest.mark.parametrize("name", FILES)
def test_special_file_instead_of_a_model_file(tmp_path, name, kind):
    model = tmp_path / "m"
    shutil.copytree(assets.MODEL_DIR, model)
    (model / name).unlink()
    if kind == "fifo":
        os.mkfifo(model / name)
    else:
        (model / name).mkdir()
    with pytest.raises(ModelLoadError, match=f"{name}: not a regular file"):
        edgemoe.load(model)
