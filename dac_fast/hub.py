"""Where checkpoint files come from and go to: their names, a local directory or a Hugging Face Hub id resolved
to a directory (downloads and uploads through huggingface_hub when it is installed)."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Mapping

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"
PREPROCESSOR_NAME = "preprocessor_config.json"
_HUB_FILES = [CONFIG_NAME, SAFETENSORS_NAME, TORCH_WEIGHTS_NAME, PREPROCESSOR_NAME]

# Keyword arguments passed on to huggingface_hub.snapshot_download for hub ids (ignored for directories).
HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token", "force_download", "proxies", "subfolder")


def check_hub_kwargs(hub_kwargs: Mapping, caller: str = "from_pretrained") -> None:
    """A TypeError naming every keyword argument that is neither ours nor huggingface_hub's (transformers'
    spellings we do not support would otherwise be ignored silently)."""
    unknown = sorted(set(hub_kwargs) - set(HUB_KWARGS))
    if unknown:
        raise TypeError(
            f"{caller}() got unexpected keyword arguments {unknown}; it accepts device, dtype (or torch_dtype), "
            f"device_map, backend, config, state_dict, output_loading_info and the hub arguments {list(HUB_KWARGS)}"
        )


def resolve_directory(path_or_id, subfolder: str = "", **hub_kwargs) -> str:
    """The local directory holding a checkpoint: ``path_or_id`` itself or a hub id's snapshot, then ``subfolder``
    inside it (transformers' argument for a model stored below the repository root)."""
    path = os.fspath(path_or_id)
    if os.path.isdir(path):
        directory = os.path.join(path, subfolder)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"subfolder {subfolder!r} does not exist in {path!r}")
        return directory
    if os.path.exists(path):
        raise ValueError(f"{path!r} is a file; from_pretrained expects a directory or hub id "
                         "(use DacModel.from_original for a .pth)")
    if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", path):
        raise FileNotFoundError(f"{path!r} is neither a local directory nor a hub id like 'descript/dac_16khz'")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise FileNotFoundError(
            f"{path!r} is not a local directory, and huggingface_hub is not installed to fetch it "
            "(pip install 'dac-fast[hub]', or download the model and pass its directory)"
        ) from exc
    errors = []
    patterns = [f"{subfolder}/{name}" if subfolder else name for name in _HUB_FILES]
    # the local cache first, then (unless local_files_only) the network
    for local_only in (True,) if hub_kwargs.pop("local_files_only", False) else (True, False):
        try:
            snapshot = snapshot_download(path, allow_patterns=patterns, local_files_only=local_only, **hub_kwargs)
            return os.path.join(snapshot, subfolder)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    raise FileNotFoundError(f"could not find {path!r} in the Hugging Face cache or on the hub: {errors[-1]}")


# The keyword arguments push_to_hub / save_pretrained(push_to_hub=True) take (transformers' names).
PUSH_KWARGS = ("repo_id", "commit_message", "commit_description", "private", "token", "revision", "create_pr")


def check_push_kwargs(kwargs, caller: str) -> None:
    """A TypeError naming keyword arguments that nothing here uses (transformers' sharding, variants, PEFT and
    distributed saving options would otherwise be dropped silently)."""
    unknown = sorted(set(kwargs) - set(PUSH_KWARGS))
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword arguments {unknown}; it accepts {list(PUSH_KWARGS)} "
                        "(see README, Differences from transformers)")


def _hub_api(what: str):
    try:
        from huggingface_hub import HfApi
    except ImportError as exc:
        raise ImportError(f"{what} needs huggingface_hub: pip install 'dac-fast[hub]' (or huggingface_hub)") from exc
    return HfApi


def upload_folder(directory, repo_id: str | None = None, *, commit_message: str | None = None,
                  commit_description: str | None = None, private: bool | None = None, token=None,
                  revision: str | None = None, create_pr: bool = False):
    """Create ``repo_id`` (default: the directory's name) if needed and upload ``directory`` to it."""
    api = _hub_api("push_to_hub")(token=token)
    repo_id = repo_id or os.path.basename(os.path.abspath(directory))
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=os.fspath(directory), revision=revision,
                             commit_message=commit_message or "Upload with dac_fast",
                             commit_description=commit_description, create_pr=create_pr)


def push_saved(obj, repo_id: str, **kwargs):
    """``obj.save_pretrained`` into a temporary directory, then upload it to ``repo_id``."""
    check_push_kwargs({"repo_id": repo_id, **kwargs}, "push_to_hub")
    _hub_api("push_to_hub")  # fail before writing anything
    with tempfile.TemporaryDirectory() as directory:
        obj.save_pretrained(directory)
        return upload_folder(directory, repo_id, **kwargs)


@contextlib.contextmanager
def save_directory(path, push_to_hub: bool, kwargs, caller: str = "save_pretrained"):
    """The directory a ``save_pretrained`` writes into (created; a file there is an error), uploaded afterwards
    when ``push_to_hub``; ``kwargs`` are the upload's (checked before anything is written)."""
    check_push_kwargs(kwargs, caller)
    if os.path.isfile(path):
        raise ValueError(f"save_directory {os.fspath(path)!r} is a file: expected a directory")
    os.makedirs(path, exist_ok=True)
    yield os.fspath(path)
    if push_to_hub:
        upload_folder(path, **kwargs)
