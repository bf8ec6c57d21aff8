"""`pivotmerge push OUT org/name`: upload a merged model folder to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("push")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the hub repo as private.")
def push_command(folder: Path, repo_id: str, private: bool) -> None:
    """Upload FOLDER (a merged model with its card and report) to the hub repo REPO_ID.

    The token is huggingface_hub's own: HF_TOKEN, or the one `hf auth login` saved.
    """
    from pivotmerge.repos.hub import push

    info = push(folder, repo_id, token=None, private=private)
    click.echo(f"pushed {folder} to {getattr(info, 'commit_url', repo_id)}")
