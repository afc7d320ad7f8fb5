"""`tdm export --push-to-hub REPO`: upload an export folder to the Hugging Face Hub with huggingface_hub."""

from __future__ import annotations

from pathlib import Path

from .optional import require


def push_to_hub(export_dir: str | Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Create the model repo `repo_id` (kept if it exists) and upload the export folder to its root in one
    commit; returns the commit's URL. `token`: default, huggingface_hub's own (HF_TOKEN or `hf auth login`)."""
    hub = require("huggingface_hub", "--push-to-hub", "huggingface_hub")
    export_dir = Path(export_dir)
    api = hub.HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=export_dir,
                               commit_message=f"TDM student: {export_dir.name}")
    return str(commit)
