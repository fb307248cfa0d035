"""Uploads to the Hugging Face Hub (``push_to_hub``), through huggingface_hub when it is installed."""

from __future__ import annotations

import contextlib
import os
import tempfile

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
