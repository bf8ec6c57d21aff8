"""The Hugging Face Hub: hub ids resolved through `huggingface_hub`'s cache, model cards, push.

A hub id ``org/name[@revision]`` resolves with `snapshot_download`, fetching only the
files a merge reads (never pickled weights). Downloads are off unless allowed: then
only the local cache answers, and a repo it lacks is refused in one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from pivotmerge.errors import RepoError

# What a merge reads from an input: weights, config, tokenizer and processor files.
NEEDED_FILES = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def hub_cache_dir() -> Path:
    """huggingface_hub's cache folder, read from the environment now (its own constant is fixed at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


DOWNLOADS_OFF = ("downloads are off (the CLI allows them with --allow-downloads, "
                 "the service with PIVOTMERGE_HUB_ALLOW_DOWNLOADS=true)")


def resolve_hub_id(repo_id: str, revision: str | None, *, allow_downloads: bool) -> Path:
    """The snapshot folder of `repo_id` at `revision` (a branch, tag or commit; default main)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    at = f"{repo_id}@{revision}" if revision else repo_id
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=NEEDED_FILES,
                                      cache_dir=hub_cache_dir(),
                                      local_files_only=not allow_downloads))
    except LocalEntryNotFoundError:
        # The same engine runs under the CLI and the service: name the switch of each.
        how = "it could not be downloaded" if allow_downloads else DOWNLOADS_OFF
        raise RepoError(f"{at}: not in the Hugging Face cache ({hub_cache_dir()}) and {how}") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise RepoError(f"{at}: {str(exc).splitlines()[0]}") from None
    except (HfHubHTTPError, OSError) as exc:
        raise RepoError(f"{at}: cannot download: {str(exc).splitlines()[0]}") from None


def hub_origin(path: Path) -> tuple[str, str] | None:
    """(hub id, commit sha) of a snapshot folder in a Hugging Face cache, or None for any other folder."""
    if path.parent.name != "snapshots" or not path.parent.parent.name.startswith("models--"):
        return None
    return path.parent.parent.name.removeprefix("models--").replace("--", "/"), path.name


def inputs_report(refs: Sequence[tuple[str, str, Path]]) -> list[dict[str, Any]]:
    """Each input (spec field, reference, folder) with the hub id and commit it resolved to, if any."""
    out = []
    for field, ref, path in refs:
        origin = hub_origin(path)
        out.append({"field": field, "model": ref, **({"hub_id": origin[0], "commit": origin[1]} if origin else {})})
    return out


def card_data(hub_ids: Sequence[str], method: str) -> Any:
    """The model card's metadata: the inputs' hub ids as base_model (never a local path)."""
    from huggingface_hub import ModelCardData

    hub_ids = list(dict.fromkeys(hub_ids))
    return ModelCardData(library_name="transformers", pipeline_tag="image-text-to-text",
                         base_model=hub_ids or None, base_model_relation="merge" if hub_ids else None,
                         tags=["merge", "pivotmerge", method])


def push(folder: Path, repo_id: str, *, token: str | None, private: bool = False, endpoint: str | None = None,
         api: Any = None) -> Any:
    """Upload a merged model folder to `repo_id` (created if missing); returns the commit info.

    `endpoint` is the hub's URL (default: huggingface_hub's, https://huggingface.co or HF_ENDPOINT).
    """
    from huggingface_hub import HfApi

    if not (folder / "merge_report.json").is_file():
        raise RepoError(f"{folder}: not a merged model (no merge_report.json)")
    api = api or HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                             commit_message="Upload a model merged with PivotMerge",
                             ignore_patterns=[".*"])
