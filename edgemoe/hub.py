"""Models named by a Hugging Face hub id (`ORG/NAME`): downloaded once into the hub cache
with `huggingface_hub.snapshot_download`, then used from there like a local directory.

Only what edgemoe reads is fetched: safetensors weights, configs, tokenizer files and the
chat template (and, for a repository holding a converted model, its manifest, expert
store and predictor). Pickle checkpoints are never downloaded. Where the files go and
whether the hub may be contacted are huggingface_hub's settings (HF_HUB_CACHE,
HF_HUB_OFFLINE, HF_TOKEN, `hf auth login`).
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import ModelLoadError

# Files of a model repository that edgemoe reads; files in subfolders are skipped.
ALLOW_PATTERNS = [
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "manifest.json", "experts.bin", "predictor.npz",  # a model written by 'edgemoe convert'
]
IGNORE_PATTERNS = ["*/*"]

# The hub's rule for repository ids: "namespace/name", letters, digits, '-', '_', '.',
# at most 96 characters each, no '--' or '..'.
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
HUB_ID = re.compile(rf"^{_PART}/{_PART}$")


def is_hub_id(name: str) -> bool:
    """Whether `name` has the form of a hub id (`ORG/NAME`)."""
    return bool(HUB_ID.match(name)) and "--" not in name and ".." not in name


def resolve_model(model: str | Path) -> Path:
    """A local model directory for `model`: the path itself when it exists (or does not
    look like a hub id), else the hub repository of that id, downloaded into the cache
    (or found there) with a progress bar. Errors are ModelLoadErrors naming the id."""
    if (isinstance(model, Path) or Path(model).exists() or not is_hub_id(str(model))
            or str(model).lower().endswith(".gguf")):  # a GGUF file name, not a repository
        return Path(model)
    return download(str(model))


def download(repo_id: str) -> Path:
    """Download (or find in the hub cache) the files edgemoe reads from `repo_id`."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub import errors as hf_errors
    except ImportError:
        raise ModelLoadError(f"{repo_id}: no such directory; to download it from the Hugging Face hub, install "
                             "huggingface_hub (pip install huggingface_hub)") from None
    where = f"{repo_id}: no such directory, so it was taken as a Hugging Face hub id"
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS))
    except hf_errors.GatedRepoError:
        raise ModelLoadError(f"{where}; the repository is gated: accept its terms on https://huggingface.co/{repo_id} "
                             "and log in ('hf auth login', or set HF_TOKEN)") from None
    except hf_errors.RepositoryNotFoundError:
        raise ModelLoadError(f"{where}, but the hub has no such model (or it is private: log in with "
                             "'hf auth login', or set HF_TOKEN)") from None
    except hf_errors.RevisionNotFoundError as e:
        raise ModelLoadError(f"{where}: {_first_line(e)}") from None
    except hf_errors.LocalEntryNotFoundError as e:
        from huggingface_hub import constants

        why = ("offline mode is on (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE
               else f"the hub cannot be reached ({_cause(e)})")
        raise ModelLoadError(f"{where}, but {why} and the model is not in the hub cache "
                             f"({constants.HF_HUB_CACHE}); download it once while online, or give a local "
                             "directory") from None
    except getattr(hf_errors, "IncompleteSnapshotError", ()):  # huggingface_hub >= 2.0
        from huggingface_hub import constants

        raise ModelLoadError(f"{where}, but its copy in the hub cache ({constants.HF_HUB_CACHE}) is incomplete "
                             "(an interrupted download?) and the hub cannot be reached; run the command again "
                             "while online") from None
    except hf_errors.HfHubHTTPError as e:
        raise ModelLoadError(f"{where}; the download failed: {_first_line(e)}") from None
    except OSError as e:  # disk full, cache not writable
        raise ModelLoadError(f"{where}; the download failed: {e.strerror or e}") from None
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"{repo_id} (downloaded to {path}): the repository has no safetensors weights; edgemoe "
                             "never loads pickle checkpoints (*.bin, *.pt): convert them to safetensors first")
    return path


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _cause(e: BaseException) -> str:
    cause = e.__cause__ or e.__context__
    return f"{type(cause).__name__}: {_first_line(cause)}" if cause is not None else _first_line(e)
