"""The `quiver` command."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError
from rich.console import Console

from quiver.settings import LOOPBACK_HOSTS, Settings
from quiver.training.cli import register_commands as register_training_commands

app = typer.Typer(help="quiver: one base model, a quiver of LoRA adapters, one OpenAI-compatible API.",
                  no_args_is_help=True)
model_app = typer.Typer(help="The base model.", no_args_is_help=True)
app.add_typer(model_app, name="model")
register_training_commands(app)
console = Console(stderr=True)


def load_settings(**overrides: object) -> Settings:
    try:
        return Settings(**{key: value for key, value in overrides.items() if value is not None})
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "settings"
            console.print(f"[red]invalid setting[/red] {where} (QUIVER_{where.upper()}): {error['msg']}")
        raise typer.Exit(2) from None


@app.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="address to listen on [QUIVER_HOST]")] = None,
    port: Annotated[Optional[int], typer.Option(help="port to listen on [QUIVER_PORT]")] = None,
    model: Annotated[Optional[Path], typer.Option(help="a local HF model folder [QUIVER_MODEL]")] = None,
    store_dir: Annotated[Optional[Path], typer.Option(help="the adapter store [QUIVER_STORE_DIR]")] = None,
) -> None:
    """Start the gateway and its vLLM engine."""
    from quiver.app import serve as serve_app
    from quiver.observability import configure_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = load_settings(host=host, port=port, model=model, store_dir=store_dir)
    if not settings.auth_enabled and settings.host not in LOOPBACK_HOSTS and not settings.allow_no_auth:
        # Refuse rather than fall back to loopback: in a container a loopback server is unreachable while its
        # own healthcheck (which runs inside) still reports it healthy.
        console.print(f"[red]No API keys are set (QUIVER_ADMIN_KEYS / QUIVER_API_KEYS / QUIVER_TENANT_KEYS): refusing "
                      f"to serve without auth on {settings.host}.[/red] Set keys, listen on 127.0.0.1 "
                      f"(QUIVER_HOST), or set QUIVER_ALLOW_NO_AUTH=true to serve without auth anyway.")
        raise typer.Exit(2)
    if not settings.auth_enabled and settings.host not in LOOPBACK_HOSTS:
        console.print(f"[yellow]QUIVER_ALLOW_NO_AUTH: serving without auth on {settings.host}: anyone who can reach "
                      f"it can use and change this server.[/yellow]")
    elif not settings.auth_enabled:
        console.print("[yellow]No API keys are set: anyone on this machine can use and change this server.[/yellow]")
    if settings.tenant_keys and not settings.metrics_require_key:
        # /metrics labels series by adapter name: open to all, it would show every tenant's adapters.
        console.print("[yellow]Tenant keys are set but /metrics is open (QUIVER_METRICS_REQUIRE_KEY=false): "
                      "it lists every adapter's name.[/yellow]")
    configure_logging(settings.log_format)
    serve_app(settings)


@app.command()
def worker() -> None:
    """Train fine-tuning jobs off the serving pods: claim queued jobs from the shared store (the settings of
    `quiver serve`), train each here, register the adapter into the adapter store. Runs until stopped."""
    import asyncio

    from quiver.common.base_model import prepare_default_model
    from quiver.finetuning.runner import run_worker
    from quiver.observability import configure_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = load_settings()
    configure_logging(settings.log_format)
    if settings.uses_default_model:
        prepare_default_model(settings.model_dir)
    asyncio.run(run_worker(settings, settings.model_dir))


@model_app.command("prepare")
def model_prepare() -> None:
    """Convert the embedded default model (SmolLM2-135M-Instruct, GGUF) once into the model cache."""
    from quiver.common.base_model import prepare_default_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = load_settings()
    if not settings.uses_default_model:
        console.print(f"QUIVER_MODEL is set; {settings.model} is used as it is.")
        return
    path = prepare_default_model(settings.model_dir)
    console.print(f"[green]ready:[/green] {path}")
    typer.echo(str(path))


suite_app = typer.Typer(help="Test suites per adapter name: the gate a new version passes before it becomes current.",
                        no_args_is_help=True)
app.add_typer(suite_app, name="suite")


def _suite_failure(exc: Exception) -> typer.Exit:
    console.print(f"[red]{exc}[/red]")
    return typer.Exit(2)


@suite_app.command("check")
def suite_check(file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="a suite.json")]) -> None:
    """Validate a suite file as the server would (exit 2 with the first problem)."""
    from quiver.errors import DomainError
    from quiver.suites.service import parse_suite

    try:
        suite = parse_suite(file.read_bytes())
    except DomainError as exc:
        raise _suite_failure(exc) from None
    console.print(f"[green]valid:[/green] {len(suite.cases)} cases")


@suite_app.command("run")
def suite_run(
    ref: Annotated[str, typer.Argument(help="`name@N` (a version) or `name` (its current version)")],
    url: Annotated[str, typer.Option(help="the quiver server")] = "http://127.0.0.1:8000",
    api_key: Annotated[Optional[str], typer.Option(envvar="QUIVER_API_KEY", help="key for the chat requests")] = None,
    admin_key: Annotated[Optional[str], typer.Option(
        envvar="QUIVER_ADMIN_KEY", help="key to read the name's suite and versions (default: --api-key)")] = None,
    suite: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False,
                                                  help="run this suite file instead of the name's")] = None,
    base: Annotated[Optional[str], typer.Option(help="model for `not_worse_than: base` (default: the adapter's base)")] = None,
    current: Annotated[Optional[str], typer.Option(help="model for `not_worse_than: current` (default: name@current)")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="also write the JSON report here")] = None,
) -> None:
    """Run a suite against any server; print the Markdown report. Exit 0 if it passes, 1 if not."""
    import asyncio

    from quiver.errors import DomainError
    from quiver.suites.client import SuiteClientError, run_remote
    from quiver.suites.runner import render_markdown

    try:
        report = asyncio.run(run_remote(ref, url, api_key, admin_key, suite.read_bytes() if suite else None,
                                        base, current))
    except (DomainError, SuiteClientError) as exc:
        raise _suite_failure(exc) from None
    if json_out is not None:
        json_out.write_text(report.model_dump_json(indent=1))
    typer.echo(render_markdown(report))
    verdict = "[green]passed[/green]" if report.passed else "[red]failed[/red]"
    console.print(f"{ref}: {verdict} ({report.passed_cases}/{report.total_cases} cases)")
    raise typer.Exit(0 if report.passed else 1)


if __name__ == "__main__":
    app()
