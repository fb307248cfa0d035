"""Uploads to the Hugging Face Hub (``push_to_hub``), through huggingface_hub when it is installed."""

from __future__ import annotations

import os
import tempfile


def _hub_api(what: str):
    try:
        from huggingface_hub import HfApi
    except ImportError as exc:
        raise ImportError(f"{what} needs huggingface_hub: pip install 'dac-fast[hub]' (or huggingface_hub)") from exc
    return HfApi


def upload_folder(directory, repo_id: str | None = None, *, commit_message: str | None = None,
                  private: bool | None = None, token=None, revision: str | None = None, create_pr: bool = False):
    """Create ``repo_id`` (default: the directory's name) if needed and upload ``directory`` to it."""
    api = _hub_api("push_to_hub")(token=token)
    repo_id = repo_id or os.path.basename(os.path.abspath(directory))
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=os.fspath(directory), revision=revision,
                             commit_message=commit_message or "Upload with dac_fast", create_pr=create_pr)


def push_saved(obj, repo_id: str, **kwargs):
    """``obj.save_pretrained`` into a temporary directory, then upload it to ``repo_id``."""
    _hub_api("push_to_hub")  # fail before writing anything
    with tempfile.TemporaryDirectory() as directory:
        obj.save_pretrained(directory)
        return upload_folder(directory, repo_id, **kwargs)
