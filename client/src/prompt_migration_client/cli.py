"""The operator's command line over the HTTP API (``prompt-migration --help``, or
``python -m prompt_migration_client.cli``; the ``cli`` extra).

Every command is one or a few API calls through :class:`OperatorClient`; the
service URL and the admin token come from ``--url``/``PM_URL`` and ``--token``/``PM_ADMIN_TOKEN``.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from prompt_migration_client.errors import ClientError
from prompt_migration_client.jobs import JobState, Stage, follow_job
from prompt_migration_client.operator import OperatorClient
from prompt_migration_client.peft import adapters_to_setfile, setfile_to_adapters

cli = typer.Typer(
    help="Operate the prompt migration service over its HTTP API.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def make_client(url: str, token: str | None) -> OperatorClient:
    return OperatorClient(url, token=token, timeout_s=3600)


@cli.callback()
def connect(
    context: typer.Context,
    url: Annotated[str, typer.Option(envvar="PM_URL", help="The API's base URL.")] = (
        "http://localhost:8000"
    ),
    token: Annotated[str | None, typer.Option(envvar="PM_ADMIN_TOKEN", help="Admin token.")] = None,
) -> None:
    context.obj = make_client(url, token)


def client(context: typer.Context) -> OperatorClient:
    found: OperatorClient = context.obj
    return found


def show(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True))


@contextmanager
def byte_bar(label: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar fed with (bytes done, bytes in all); opened once the total is known."""
    state: dict[str, Any] = {"bar": None, "seen": 0}

    def update(done: int, total: int) -> None:
        if state["bar"] is None:
            opened: Any = typer.progressbar(length=max(1, total), label=label)
            state["bar"] = opened.__enter__()
        state["bar"].update(done - state["seen"])
        state["seen"] = done

    try:
        yield update
    finally:
        if state["bar"] is not None:
            state["bar"].__exit__(None, None, None)


# ---- models and sets -----------------------------------------------------------------------


@cli.command()
def register(
    context: typer.Context,
    name: str,
    checkpoint: Annotated[str | None, typer.Option(help="Built-in name or directory.")] = None,
) -> None:
    """Register a foundation model."""
    show(client(context).register_model(name, checkpoint=checkpoint))


@cli.command()
def models(context: typer.Context) -> None:
    """List models, their versions and which is active."""
    for spec in client(context).models():
        versions = ", ".join(f"{v['version']}({v['state']})" for v in spec["versions"])
        active = spec["active_version"] or "-"
        typer.echo(f"{spec['name']}  active={active}  versions: {versions or '-'}")


@cli.command()
def bundle(
    context: typer.Context,
    model: str,
    version: str,
    metrics_only: Annotated[bool, typer.Option("--metrics", help="Only the metrics.")] = False,
) -> None:
    """Show a sealed set's inference contract (or only its metrics)."""
    doc = client(context).bundle(model, version).doc
    show(doc["metrics"] if metrics_only else doc)


@cli.command()
def rollback(
    context: typer.Context,
    model: str,
    version: str,
    default: Annotated[
        bool, typer.Option("--default", help="Also serve MODEL to readers who name no model.")
    ] = False,
) -> None:
    """Serve an earlier sealed version of MODEL again (one atomic switch)."""
    show(client(context).activate(model, version, default=default))


# ---- jobs --------------------------------------------------------------------------------------


def watch_job(api: OperatorClient, job_id: str, *, interval_s: float = 1.0) -> dict[str, Any]:
    """Follow a job with a progress bar until it ends; returns its last record."""
    with typer.progressbar(length=1000, label=Stage.queued) as progress:
        shown = 0

        def show(record: dict[str, Any]) -> None:
            nonlocal shown
            progress.label = record["stage"]
            target = int(1000 * float(record["progress"].get("fraction") or 0.0))
            progress.update(max(0, target - shown))
            shown = max(shown, target)

        record = follow_job(lambda: api.job(job_id), on_update=show, interval_s=interval_s)
        progress.update(1000 - shown)
        return record


def finish(record: dict[str, Any]) -> None:
    typer.echo(f"job {record['id']}: {record['state']}")
    if record.get("error"):
        typer.echo(f"error: {record['error']}", err=True)
    if record.get("metrics"):
        show(record["metrics"])
    if record["state"] in (JobState.failed, JobState.cancelled, JobState.gate_failed):
        raise typer.Exit(1)


def started(context: typer.Context, record: dict[str, Any], *, follow: bool) -> None:
    """Says which job started and, with ``follow``, watches it to its end."""
    typer.echo(f"job {record['id']} {record['state']}")
    if follow:
        finish(watch_job(client(context), record["id"]))


@cli.command()
def watch(context: typer.Context, job_id: str) -> None:
    """Follow a job with a progress bar until it ends, then print its metrics."""
    finish(watch_job(client(context), job_id))


@cli.command()
def train(
    context: typer.Context,
    model: str,
    dataset: Annotated[str, typer.Option()],
    task: Annotated[str, typer.Option()] = "rating",
    max_users: Annotated[int | None, typer.Option()] = None,
    epochs: Annotated[int, typer.Option()] = 10,
    no_watch: Annotated[bool, typer.Option("--no-watch")] = False,
) -> None:
    """Train MODEL's first prompt set from a dataset."""
    body = {"dataset": dataset, "task": task, "epochs": epochs}
    body |= {"max_users": max_users} if max_users else {}
    started(context, client(context).train(model, body), follow=not no_watch)


@cli.command()
def migrate(
    context: typer.Context,
    source: Annotated[list[str], typer.Option(help="Source model (MODEL or MODEL@VERSION).")],
    target: Annotated[str, typer.Option()],
    dataset: Annotated[str, typer.Option()],
    budget: Annotated[int | None, typer.Option(help="Users the adapter trains on.")] = None,
    method: Annotated[str, typer.Option(help="adapter or instant")] = "adapter",
    max_users: Annotated[int | None, typer.Option()] = None,
    auto_promote: Annotated[bool, typer.Option()] = True,
    idempotency_key: Annotated[str | None, typer.Option()] = None,
    no_watch: Annotated[bool, typer.Option("--no-watch")] = False,
) -> None:
    """Start a migration to TARGET and follow it until it ends."""
    sources = []
    for item in source:
        name, _, version = item.partition("@")
        sources.append({"model": name} | ({"version": version} if version else {}))
    body: dict[str, Any] = {
        "sources": sources,
        "target": target,
        "dataset": dataset,
        "method": method,
        "auto_promote": auto_promote,
    }
    if budget is not None:
        body["selection"] = {"strategy": "puma", "budget": budget}
    if max_users is not None:
        body["max_users"] = max_users
    record = client(context).migrate(body, idempotency_key=idempotency_key)
    started(context, record, follow=not no_watch)


@cli.command()
def promote(
    context: typer.Context,
    job_id: str,
    force: Annotated[bool, typer.Option(help="Promote past a failed quality gate.")] = False,
) -> None:
    """Serve a finished migration's set."""
    show(client(context).promote(job_id, force=force))


@cli.command()
def cancel(context: typer.Context, job_id: str) -> None:
    """Ask a running job to stop."""
    show(client(context).cancel(job_id))


# ---- export and import -------------------------------------------------------------------------


@cli.command("export")
def export_set(context: typer.Context, model: str, version: str, dest: Path) -> None:
    """Stream a sealed set into one safetensors file."""
    with byte_bar(f"export {model} v{version}") as update:
        client(context).export(model, version, dest, on_progress=update)
    typer.echo(f"{dest}: {dest.stat().st_size} bytes")


def upload(api: OperatorClient, model: str, source: Path, **options: Any) -> None:
    with byte_bar(f"import into {model}") as update:
        done = api.import_file(model, source, on_progress=update, **options)
    show(done)


@cli.command("import")
def import_set(
    context: typer.Context,
    model: str,
    source: Path,
    activate: Annotated[bool, typer.Option()] = False,
    head_from_version: Annotated[str | None, typer.Option()] = None,
    dtype: Annotated[str | None, typer.Option(help="float32 or float16")] = None,
    placement: Annotated[str | None, typer.Option(help="'template' for PEFT vectors")] = None,
) -> None:
    """Import a set file as a new sealed version of MODEL."""
    upload(
        client(context),
        model,
        source,
        activate=activate,
        dtype=dtype,
        head_from_version=head_from_version,
        placement=placement,
    )


@cli.command("import-peft")
def import_peft(
    context: typer.Context,
    model: str,
    adapters: Path,
    task: Annotated[str, typer.Option()] = "rating",
    head_from_version: Annotated[str | None, typer.Option()] = None,
    placement: Annotated[str | None, typer.Option(help="'template': trained at its place")] = None,
    activate: Annotated[bool, typer.Option()] = False,
) -> None:
    """Import a directory of PEFT prompt-tuning adapters (one per user) as a new version."""
    with tempfile.TemporaryDirectory() as tmp:
        path = adapters_to_setfile(
            adapters, Path(tmp) / "peft.safetensors", task=task, placement=placement
        )
        upload(client(context), model, path, activate=activate, head_from_version=head_from_version)


@cli.command("export-peft")
def export_peft(
    context: typer.Context,
    model: str,
    version: str,
    out: Path,
    placement: Annotated[str | None, typer.Option(help="must be 'template' (see the docs)")] = None,
) -> None:
    """Write one PEFT prompt-tuning adapter directory per user of a sealed set."""
    with tempfile.TemporaryDirectory() as tmp:
        path = client(context).export(model, version, Path(tmp) / "set.safetensors")
        written = setfile_to_adapters(path, out, placement=placement)
    typer.echo(f"{len(written)} adapters under {out}")


def main() -> None:
    try:
        cli()
    except ClientError as error:
        typer.echo(f"error ({error.status or error.code}): {error.detail}", err=True)
        raise SystemExit(1) from error
    except httpx.TransportError as error:
        typer.echo(f"error: cannot reach the API ({error}); check --url / PM_URL.", err=True)
        raise SystemExit(1) from error


if __name__ == "__main__":
    main()
