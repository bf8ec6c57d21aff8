"""`pivotmerge serve`, `pivotmerge quickstart` and `pivotmerge admin`."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click

from service_core.settings import Settings
from pivotmerge.bench import CACHE
from pivotmerge.report.merge_report import MergeReport, read_report

API_KEY_FILE = "api-key"
MAX_TEAM_WEIGHT = 1000.0  # a bound: a mistyped weight (1e9) would hand one team every free worker while it has jobs
DEFAULT_TEAM = "default"


def load_settings() -> Settings:
    try:
        return Settings()
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise click.ClickException(f"configuration: {exc}") from None


def open_db(settings: Settings):  # type: ignore[no-untyped-def]
    """Sessions on the configured database, whose schema must exist.

    The embedded SQLite database is brought up to date here, so admin commands
    work on a fresh install before `serve` ever ran; a deployment's database is
    migrated by its own step, and an unmigrated one is named in one line.
    """
    from sqlalchemy import inspect

    from service_core.db import make_engine, make_sessionmaker, migrate

    if settings.embedded:
        migrate(settings.database_url)
    engine = make_engine(settings.database_url)
    if not inspect(engine).has_table("teams"):
        engine.dispose()
        raise click.ClickException("the database has no schema yet: run `pivotmerge admin migrate` first")
    return make_sessionmaker(engine)


# --------------------------------------------------------------------------- admin


@click.group("admin")
def admin() -> None:
    """Manage the service database: migrations, teams and API keys (PIVOTMERGE_DATABASE_URL)."""


@admin.command("migrate")
def migrate_command() -> None:
    """Create or upgrade the database schema (alembic upgrade head)."""
    from service_core.db import migrate

    migrate(load_settings().database_url)
    click.echo("database is up to date")


@admin.command("create-team")
@click.argument("name")
def create_team_command(name: str) -> None:
    """Create team NAME and print its first API key (shown once, stored hashed)."""
    from sqlalchemy.exc import IntegrityError

    from app.auth import check_team_name, create_api_key, create_team

    try:
        check_team_name(name)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    with open_db(load_settings())() as session:
        try:
            team = create_team(session, name)
        except IntegrityError:
            raise click.ClickException(f"a team named {name!r} already exists") from None
        row, key = create_api_key(session, team)
        session.commit()
    click.echo(f"team {name} ({team.id})\nkey id {row.id}\nAPI key: {key}")


def _team(session: Any, name: str) -> Any:
    from sqlalchemy import select

    from app.auth import check_team_name
    from service_core.models import Team

    try:
        check_team_name(name)  # a name no team can have (a NUL byte: Postgres refuses the query itself)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    team = session.scalar(select(Team).where(Team.name == name))
    if team is None:
        raise click.ClickException(f"no team named {name!r}; `pivotmerge admin list-teams` lists them")
    return team


@admin.command("create-key")
@click.argument("team")
def create_key_command(team: str) -> None:
    """Print a new API key for TEAM (by name)."""
    from app.auth import create_api_key

    with open_db(load_settings())() as session:
        row, key = create_api_key(session, _team(session, team))
        session.commit()
    click.echo(f"key id {row.id}\nAPI key: {key}")


@admin.command("revoke-key")
@click.argument("key_id", type=click.UUID)
def revoke_key_command(key_id: Any) -> None:
    """Revoke the key with id KEY_ID; requests with it answer 401 from now on."""
    from app.auth import revoke_api_key

    with open_db(load_settings())() as session:
        if revoke_api_key(session, key_id) is None:
            raise click.ClickException(f"no key with id {key_id}")
        session.commit()
    click.echo(f"revoked {key_id}")


class TeamWeight(click.FloatRange):
    """A weight in (0, MAX_TEAM_WEIGHT]; NaN too is refused (FloatRange's comparisons let it through)."""

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        weight = super().convert(value, param, ctx)
        if math.isnan(weight):
            self.fail("nan is not a weight", param, ctx)
        return weight


@admin.command("set-team")
@click.argument("team")
@click.option("--weight", type=TeamWeight(min=0, min_open=True, max=MAX_TEAM_WEIGHT),
              help="The team's share of the workers against other teams with waiting jobs (default 1).")
@click.option("--max-running", type=click.IntRange(min=0),
              help="Jobs the team may have on workers at once (0 holds its jobs in the queue).")
@click.option("--default-max-running", is_flag=True,
              help="Back to the deployment's cap (PIVOTMERGE_MAX_ACTIVE_JOBS_PER_TEAM).")
def set_team_command(team: str, weight: float | None, max_running: int | None, default_max_running: bool) -> None:
    """Set TEAM's fair-share weight and running cap (docs/service.md, Team queues)."""
    if max_running is not None and default_max_running:
        raise click.UsageError("--max-running and --default-max-running exclude each other")
    if weight is None and max_running is None and not default_max_running:
        raise click.UsageError("give --weight, --max-running or --default-max-running")
    with open_db(load_settings())() as session:
        row = _team(session, team)
        if weight is not None:
            row.weight = weight
        if max_running is not None or default_max_running:
            row.max_running_jobs = max_running
        session.commit()
        click.echo(f"team {row.name}: {team_queue_line(row)}")


def team_queue_line(team: Any) -> str:
    cap = "the default" if team.max_running_jobs is None else str(team.max_running_jobs)
    return f"weight {team.weight:g}, running cap {cap}"


@admin.command("list-teams")
def list_teams_command() -> None:
    """Teams (weight and running cap) and their keys (prefixes only)."""
    from sqlalchemy import select

    from service_core.models import Team

    with open_db(load_settings())() as session:
        for team in session.scalars(select(Team).order_by(Team.name)):
            click.echo(f"{team.name}  {team.id}  {team_queue_line(team)}")
            for key in team.api_keys:
                state = f"revoked {key.revoked_at:%Y-%m-%d}" if key.revoked_at else "active"
                click.echo(f"    {key.id}  {key.prefix}...  {state}")


# --------------------------------------------------------------------------- serve


def ensure_default_key(settings: Settings) -> Path:
    """Embedded mode: a `default` team and its key in data_dir/api-key, made on first start."""
    from sqlalchemy import func, select

    from app.auth import create_api_key, create_team
    from service_core.models import Team

    key_file = settings.data_dir / API_KEY_FILE
    with open_db(settings)() as session:
        if session.scalar(select(func.count()).select_from(Team)) == 0 or not key_file.exists():
            team = session.scalar(select(Team).where(Team.name == DEFAULT_TEAM)) or create_team(session, DEFAULT_TEAM)
            _, key = create_api_key(session, team)
            session.commit()
            key_file.touch(mode=0o600)
            key_file.write_text(key + "\n")
    return key_file


def start_worker(queues: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "celery", "--quiet", "-A", "workers.worker", "worker",
                             "-Q", ",".join(queues), "-c", "1", "-l", "warning", "--without-gossip", "--without-mingle"],
                            cwd=Path(__file__).resolve().parent.parent)


WORKER_STOP_SECONDS = 20


def stop_process(process: subprocess.Popen[bytes], timeout: float = WORKER_STOP_SECONDS) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


WORKER_RESTART_SECONDS = 2.0


class SupervisedWorker:
    """serve's worker, started again whenever it exits on its own (killed, out of memory, crashed).

    Its job comes back through the lease reaper of serve's API (the embedded
    broker never returns a message a dead worker had taken); without a new
    worker it would wait in the queue for good.
    """

    def __init__(self, queues: list[str]) -> None:
        self.queues = queues
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.process = start_worker(queues)
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while True:
            code = self.process.wait()
            # A pause, so a worker that cannot start is not restarted in a tight loop.
            if self._stopping.wait(WORKER_RESTART_SECONDS):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                click.echo(f"the worker exited (status {code}); starting a new one", err=True)
                self.process = start_worker(self.queues)

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
        stop_process(self.process)
        self._thread.join()


def bind_port(host: str, port: int) -> socket.socket:
    """The API's socket, bound as uvicorn would bind it; a port in use is one line."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}; is another service running "
                                   "there? Choose another port with --port") from None
    return sock


def exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(0)


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--worker/--no-worker", default=True, show_default=True,
              help="Also run a Celery worker (one job at a time) beside the API.")
def serve(host: str, port: int, worker: bool) -> None:
    """Run the merge service: the HTTP API, and a worker unless --no-worker.

    With no configuration everything lives under ~/.pivotmerge (SQLite database
    and broker, local artifacts, models read from ~/.pivotmerge/models) and a
    `default` team's API key is written to ~/.pivotmerge/api-key. Set
    PIVOTMERGE_DATABASE_URL, PIVOTMERGE_BROKER_URL, ... for a real deployment
    (docs/service.md).
    """
    import uvicorn

    from service_core.db import migrate
    from app.main import create_app
    from workers.celery_app import service_queues

    listening = bind_port(host, port)  # before anything starts or says the API is up
    settings = load_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    for root in settings.allowed_roots:
        root.mkdir(parents=True, exist_ok=True)
    migrate(settings.database_url)
    if settings.embedded:
        key_file = ensure_default_key(settings)
        click.echo(f"embedded mode: data in {settings.data_dir}; models are read from "
                   f"{os.pathsep.join(map(str, settings.allowed_roots))}\nAPI key of team '{DEFAULT_TEAM}': {key_file}")
    # Every queue the service sends to (jobs, webhook deliveries, trials): a queue without a reader would
    # hold its messages for good.
    supervised = SupervisedWorker(service_queues(settings)) if worker else None
    # uvicorn re-raises the SIGTERM it caught once it has shut down; as SystemExit
    # it reaches the `finally` below instead of killing us with the worker left running.
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        click.echo(f"API on http://{host}:{port} (docs at /docs)")
        uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning")).run(sockets=[listening])
    finally:
        if supervised is not None:
            supervised.stop()


# --------------------------------------------------------------------------- quickstart


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_embedded_service(data_dir: Path, **settings: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    """`pivotmerge serve` in embedded mode on a free port, with `settings` (PIVOTMERGE_<NAME>) and no other
    PIVOTMERGE_* the caller has set."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIVOTMERGE_")}
    env.update({f"PIVOTMERGE_{name.upper()}": value for name, value in settings.items()})
    env["PIVOTMERGE_DATA_DIR"] = str(data_dir)
    # One torch thread for the example's tiny models: on a busy 2-core machine a second one spins, and
    # evaluating one of them took 27-30 s with 2 threads against 1.7 s with one.
    env["OMP_NUM_THREADS"] = "1"
    log = data_dir / "service.log"
    with log.open("wb") as out:
        server = subprocess.Popen([sys.executable, "-c", "from pivotmerge.cli.main import main; main()", "serve",
                                   "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT)
    return server, f"http://127.0.0.1:{port}", log


def wait_until_ready(server: subprocess.Popen[bytes], base_url: str, key_file: Path, log: Path,
                     timeout: float = 120) -> Any:
    """A pivotmerge.client.Client of the embedded service once it answers ready (its key file written first)."""
    from pivotmerge.client import Client

    deadline = time.monotonic() + timeout
    client = None
    while True:
        if server.poll() is not None:
            raise click.ClickException(f"the service did not start; the end of {log}:\n{log.read_text()[-2000:]}")
        if client is None and key_file.is_file() and (key := key_file.read_text().strip()):
            client = Client(base_url, key)
        if client is not None and client.ready():
            return client
        if time.monotonic() > deadline:
            raise click.ClickException(f"the service did not become ready within {timeout:.0f} s; see {log}")
        time.sleep(0.2)


def follow_job(client: Any, job_id: str, console: Any) -> dict[str, Any]:
    """A progress bar fed by the job's event stream (resumed if it drops); returns the finished job."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("    {task.description:<28}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("queued", total=1.0)
        for event in client.follow(job_id):
            data = event["data"]
            if event["type"] == "progress":
                label = data["stage"] + (f" layer {data['layer']}" if data.get("layer") is not None else "")
                bar.update(task, completed=data["fraction"], description=label)
            elif event["type"] == "state":
                bar.update(task, description=data["state"])
    return client.get(job_id)  # type: ignore[no-any-return]


@click.command("quickstart")
@click.option("--dir", "workdir", default="pivotmerge-quickstart", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Where the example models, service data and result go.")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=CACHE, show_default=True,
              help="Where the trained example's world is kept after its first build (shared with `pivotmerge bench`).")
def quickstart(workdir: Path, cache: Path) -> None:
    """Train small experts, start the embedded service, merge them with PivotMerge over HTTP, download the result,
    and compare the merged model with the base and every expert on every domain."""
    started = time.monotonic()
    workdir = workdir.resolve()
    data_dir = workdir / "service"
    # The service boots (seconds of imports) while the example is built.
    server, base_url, log = start_embedded_service(data_dir)
    try:
        import yaml
        from rich.console import Console

        from pivotmerge.bench.trained_example import make_trained_example
        from pivotmerge.client import ClientError

        console = Console()
        with console.status(f"building the trained example (about a minute the first time; then read from {cache})") as status:
            example = make_trained_example(data_dir / "models" / "example", cache, progress=status.update)
        console.print(f"[bold]1.[/] A tiny LLaVA base model and {len(example.experts)} experts, each trained on one "
                      f"domain ({', '.join(example.datasets)}), with their data, in {example.root}")

        client = wait_until_ready(server, base_url, data_dir / API_KEY_FILE, log)
        console.print(f"[bold]2.[/] Started the embedded service (API + Celery worker, SQLite) on {base_url}")

        spec = yaml.safe_load(example.spec.read_text())
        try:
            job = client.submit(spec, idempotency_key=f"quickstart-{started}")
        except ClientError as exc:
            raise click.ClickException(f"the service refused the merge: {exc.detail}") from None
        location = f"/v1/merges/{job['id']}"
        console.print(f"[bold]3.[/] Submitted a {spec['method']} merge of the experts' projectors, with each "
                      f"expert's calibration data, evaluated on each domain's test split: POST /v1/merges -> 202, {location}")

        job = follow_job(client, job["id"], console)
        if job["state"] != "succeeded":
            raise click.ClickException(f"the merge {job['state']}: {job['error']}")
        out = workdir / "merged"
        files = client.download(job["id"], out)  # resumes a partial file; checks each file's sha256
        console.print(f"[bold]4.[/] Downloaded {len(files)} files to {out} (sha256 of each checked)")
        metrics = client.metrics(job["id"])
    finally:
        stop_process(server, timeout=WORKER_STOP_SECONDS + 10)  # serve first waits for its worker

    console.print(f"[bold]5.[/] The merge report (all of it: {out / 'merge_report.json'}):")
    print_report(console, read_report(out))
    console.print(f"[bold]6.[/] What merging bought, from GET {location}/metrics:")
    console.print(comparison_table(metrics, spec))
    console.print(f"\nDone in {time.monotonic() - started:.1f} s. Next: `pivotmerge serve` runs the service "
                  f"(docs at http://127.0.0.1:8000/docs); docs/service.md covers the API and deployment.")
    console.print(f"This job in the dashboard: `PIVOTMERGE_DATA_DIR={data_dir} pivotmerge serve`, then open http://127.0.0.1:8000/ui{location.removeprefix('/v1')} and sign in with the key in {data_dir / API_KEY_FILE}", soft_wrap=True)


def comparison_table(metrics: dict[str, list[dict[str, Any]]], spec: dict[str, Any]) -> Any:
    """Token accuracy of the merged model, the base and each expert (rows) on each evaluated dataset (columns).

    `metrics` is a merge's evaluation as `GET /v1/merges/{id}/metrics` returns it: labels
    'merged', 'base' and each expert's spec `model`; an expert's own domain, the
    dataset named like its folder (`expert_<domain>`), is in bold.
    """
    from rich.table import Table

    datasets = [m["dataset"] for m in metrics["merged"]]
    table = Table("model", "what it is", *datasets, "mean",
                  title="Token accuracy on each domain's test split (higher is better)",
                  caption="Each expert knows its own domain (bold); the merged model is one model for all of them.")
    experts = {entry["model"]: Path(entry["model"]).name for entry in spec["models"]}
    roles = {"merged": f"the {len(experts)} experts merged by {spec['method']}",
             "base": "the shared start: no expert training"}
    for label, rows in metrics.items():
        name = experts.get(label, label)
        own = name.removeprefix("expert_") if label in experts else None
        accuracy = {m["dataset"]: m["token_accuracy"] for m in rows}
        cells = [f"[bold]{accuracy[d]:.3f}[/]" if d == own else f"{accuracy[d]:.3f}" for d in datasets]
        mean = sum(accuracy.values()) / len(accuracy)
        table.add_row(name, roles.get(label, f"trained on {own} only" if own else "an input"), *cells, f"{mean:.3f}")
    return table


def compact(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "[" + ", ".join(compact(v) for v in value) + "]"
    return json.dumps(value)


def print_report(console: Any, report: MergeReport) -> None:
    """What was merged and how: the summary, then each merged tensor's recorded choices."""
    from rich.table import Table

    console.print_json(data=report.model_dump(mode="json", include={"method", "architecture", "device", "tensors", "timings"}))
    table = Table("merged tensor", "layer", "choices (lambda, expert weights, ranks...)")
    for entry in report.layers:
        info = ", ".join(f"{k}={compact(v)}" for k, v in (entry.info or {}).items())
        table.add_row(entry.tensor, str(entry.layer), info)
    console.print(table)
