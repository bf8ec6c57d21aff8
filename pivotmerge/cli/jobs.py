"""`pivotmerge jobs ...`: submit, list, watch, download and cancel jobs of a merge service (pivotmerge.client)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from pivotmerge.client import Client, ClientError
from pivotmerge.cli.commands import console
from pivotmerge.spec.schema import read_yaml


def _labels(pairs: tuple[str, ...]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--label")
        labels[key] = value
    return labels


class ServiceErrorsInOneLine(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except ClientError as exc:  # the service's one-line answer, as every user error (exit 2)
            raise click.ClickException(str(exc)) from None


@click.group("jobs", cls=ServiceErrorsInOneLine)
def jobs() -> None:
    """Jobs of a merge service: PIVOTMERGE_URL (default http://127.0.0.1:8000) with PIVOTMERGE_API_KEY."""


@jobs.command("submit")
@click.argument("spec_file", metavar="SPEC", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="A label for the job; repeatable.")
@click.option("--idempotency-key", help="Makes a retried submit return the same job.")
@click.option("--priority", type=int, default=0, show_default=True,
              help="Order among the team's own waiting jobs, -1000 to 1000: higher starts first.")
def submit(spec_file: Path, labels: tuple[str, ...], idempotency_key: str | None, priority: int) -> None:
    """Queue the merge a YAML (or mergekit) SPEC describes; prints the job id."""
    job = Client().submit(read_yaml(spec_file), labels=_labels(labels), idempotency_key=idempotency_key,
                          priority=priority)
    click.echo(job["id"])


@jobs.command("list")
@click.option("--state", "states", multiple=True, help="Only jobs in this state; repeatable.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Only jobs with this label; repeatable.")
def list_jobs(states: tuple[str, ...], labels: tuple[str, ...]) -> None:
    """The team's merges, newest first: id, state, progress, created, labels."""
    for job in Client().jobs(states=list(states), labels=_labels(labels)):
        tags = ",".join(f"{k}={v}" for k, v in job["labels"].items())
        click.echo(f"{job['id']}  {job['state']:<10}  {job['progress']['fraction']:>4.0%}  {job['created_at']}  {tags}")


@jobs.command("watch")
@click.argument("job_id")
def watch(job_id: str) -> None:
    """Follow a job's progress (its event stream) until it ends; exit 1 unless it succeeded."""
    client = Client()
    job = client.get(job_id)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task(job["state"], total=1.0, completed=job["progress"]["fraction"])
        for event in client.follow(job_id):
            data = event["data"]
            if event["type"] == "progress":
                bar.update(task, completed=data.get("fraction", 0.0), description=data.get("stage") or "running")
            elif event["type"] == "state":
                bar.update(task, description=data["state"])
    job = client.get(job_id)
    click.echo(f"{job_id} {job['state']}" + (f": {job['error']}" if job["error"] else ""))
    if job["state"] != "succeeded":
        raise SystemExit(1)


@jobs.command("download")
@click.argument("job_id")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the files; partial files there are resumed.")
def download(job_id: str, out_dir: Path) -> None:
    """Download a succeeded job's files, resuming partial ones, each checked against its sha256."""
    client = Client()
    state = client.get(job_id)["state"]
    if state != "succeeded":
        raise click.ClickException(f"job {job_id} is {state}; only a succeeded job has files to download")
    for path in client.download(job_id, out_dir):
        click.echo(path)


@jobs.command("cancel")
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Cancel a queued or running job."""
    job = Client().cancel(job_id)
    click.echo(f"{job_id} {job['state']}")

