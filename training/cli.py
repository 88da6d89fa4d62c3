"""`quiver data check`, `quiver train`, `quiver eval`, `quiver merge`: added to the main CLI by `register_commands`."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

import typer
from rich.console import Console
from rich.table import Table

from quiver.training.config import TrainConfig

console = Console()
err_console = Console(stderr=True)

ADMIN_KEY_ENV = "QUIVER_ADMIN_KEY"
API_KEY_ENV = "QUIVER_API_KEY"


def _base_model(base_model: Path | None) -> tuple[Path, str | None]:
    if base_model is not None:
        return base_model, None
    from quiver.training.trainer import default_base_model

    return default_base_model()


def data_check(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL training file")],
    max_seq_len: Annotated[int, typer.Option(help="flag examples longer than this many tokens")] = 1024,
    base_model: Annotated[Optional[Path], typer.Option(help="HF model folder whose tokenizer counts tokens; default: the served base")] = None,
    tokens: Annotated[bool, typer.Option(help="count tokens with the base model's tokenizer")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    data_format: Annotated[str, typer.Option("--format", help="auto (from the first line), chat (supervised: messages "
                                             "or prompt/response) or preference (DPO: input/preferred_output/"
                                             "non_preferred_output)")] = "auto",
) -> None:
    """Validate a training file: line-numbered errors and warnings, then a summary."""
    from quiver.training.data import check_training_file
    from quiver.training.trainer import load_tokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = load_tokenizer(_base_model(base_model)[0]) if tokens else None
    if data_format not in ("auto", "chat", "preference"):
        err_console.print(f"[red]--format must be auto, chat or preference, not {data_format!r}")
        raise typer.Exit(2)
    report = check_training_file(file, tokenizer, max_seq_len if tokens else None, data_format)
    if as_json:
        issues = [{"severity": i.severity, "code": i.code, "line": i.line, "message": i.message} for i in report.issues]
        console.print_json(json.dumps({"summary": report.summary(), "issues": issues}))
    else:
        for issue in report.issues:
            style = "red" if issue.severity == "error" else "yellow"
            console.print(f"[{style}]{issue}", markup=True, highlight=False)
        table = Table(title=f"{file}", show_header=False)
        for key, value in report.summary().items():
            table.add_row(key, json.dumps(value) if isinstance(value, dict) else str(value))
        console.print(table)
    raise typer.Exit(0 if report.ok else 1)


def train_command(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL training file")],
    name: Annotated[str, typer.Option(help="adapter name (also the run folder's name)")],
    out: Annotated[Optional[Path], typer.Option(help="run folder; default out/<name>")] = None,
    validation_file: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False)] = None,
    config: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help="YAML hyperparameters")] = None,
    base_model: Annotated[Optional[Path], typer.Option(help="HF model folder; default: the served base")] = None,
    register: Annotated[Optional[str], typer.Option(help="quiver server URL to upload the adapter to, then evaluate on")] = None,
    admin_key: Annotated[Optional[str], typer.Option(envvar=ADMIN_KEY_ENV, help="admin key for --register")] = None,
    api_key: Annotated[Optional[str], typer.Option(envvar=API_KEY_ENV, help="API key for the evaluation requests")] = None,
    evaluate: Annotated[bool, typer.Option(help="after --register, compare base and adapter on the test split")] = True,
    **hyperparameters: Any,
) -> None:
    """Train a LoRA adapter on FILE; optionally register it on a running server and evaluate it there.

    Every hyperparameter option overrides the YAML --config, which overrides TrainConfig's defaults.
    """
    from pydantic import ValidationError

    from quiver.training.data import DatasetError
    from quiver.training.encoding import LossMaskError
    from quiver.training.trainer import InitAdapterError, train

    overrides = {key: value for key, value in hyperparameters.items() if value is not None}
    try:
        train_config = TrainConfig.from_yaml(config, **overrides) if config else TrainConfig(**overrides)
    except ValidationError as exc:
        err_console.print(f"[red]invalid hyperparameters:[/red]\n{exc}")
        raise typer.Exit(2) from exc
    base_dir, base_name = _base_model(base_model)
    run_dir = out or Path("out") / name
    try:
        result = train(
            file, run_dir, train_config, name=name, validation_file=validation_file,
            base_model_dir=base_dir, base_model_name=base_name, console=console,
        )
    except (DatasetError, LossMaskError, InitAdapterError) as exc:
        err_console.print(f"[red]{exc}")
        raise typer.Exit(1) from exc
    from quiver.training.trainer import is_main_process

    if not is_main_process():  # under torchrun: the first process reports and registers, once
        return
    training = result.manifest["training"]
    console.print(
        f"[green]adapter written to {run_dir}[/green]: {training['steps']} steps in {training['train_seconds']} s, "
        f"train loss {training['first_train_loss']:.4f} -> {training['final_train_loss']:.4f}, "
        f"validation loss {training['initial_validation_loss']} -> {training['final_validation_loss']}"
    )
    if register:
        _register_and_evaluate(run_dir, register, name, admin_key, api_key, evaluate)


def _cli_type(annotation: Any) -> type | None:
    """The option type for a TrainConfig field: scalars as they are, `int | "auto"` as text that TrainConfig
    parses; lists (target_modules) are left to the YAML --config."""
    if annotation in (int, float, bool, str, Path):
        return annotation
    if get_origin(annotation) is Literal:  # e.g. method: TrainConfig checks the choice
        return str
    args = [arg for arg in get_args(annotation) if arg is not type(None)]
    if get_origin(annotation) in (Union, UnionType) and args:
        if len(args) == 1:
            return _cli_type(args[0])
        if any(get_origin(arg) is Literal for arg in args) and all(
                arg in (int, float) or get_origin(arg) is Literal for arg in args):
            return str
    return None


def _with_hyperparameter_options(command: Any) -> Any:
    """Give `command` one option per TrainConfig field, so a new hyperparameter needs no CLI code."""
    signature = inspect.signature(command, eval_str=True)
    fixed = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    taken = {p.name for p in fixed}
    generated = []
    for field_name, field in TrainConfig.model_fields.items():
        option_type = _cli_type(field.annotation)
        if option_type is None or field_name in taken:
            continue
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description + '; ' if field.description else ''}default {default}"
        annotation = Annotated[Optional[option_type], typer.Option(help=help_text, show_default=False)]
        generated.append(inspect.Parameter(field_name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                           annotation=annotation))
    command.__signature__ = signature.replace(parameters=[*fixed, *generated])
    command.__annotations__ = {p.name: p.annotation for p in command.__signature__.parameters.values()}
    return command


def _register_and_evaluate(
    run_dir: Path, url: str, name: str, admin_key: str | None, api_key: str | None, evaluate: bool
) -> None:
    from quiver.training.register import RegistrationError, register_adapter

    try:
        record = register_adapter(run_dir, url, name, admin_key)
    except RegistrationError as exc:
        err_console.print(f"[red]{exc}")
        raise typer.Exit(1) from exc
    from quiver.training.register import SUITE_REPORT_FILE, describe_registration

    gate = record.get("gate")
    colour = "yellow" if gate and not gate.get("passed") else "green"
    console.print(f"[{colour}]{describe_registration(record)}[/{colour}] on {url}")
    if gate:
        console.print(f"suite report: {url.rstrip('/')}{gate['report']}.md (saved as {run_dir / SUITE_REPORT_FILE})")
    if evaluate:
        _print_eval(run_dir, url, api_key, None, None)


def eval_command(
    run_dir: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="a training run folder")],
    url: Annotated[str, typer.Option(help="OpenAI-compatible server serving the base and the adapter")] = "http://127.0.0.1:8000",
    api_key: Annotated[Optional[str], typer.Option(envvar=API_KEY_ENV)] = None,
    base_model: Annotated[Optional[str], typer.Option(help="served name of the base; default from the manifest")] = None,
    adapter_model: Annotated[Optional[str], typer.Option(help="served name of the adapter; default: the registered id")] = None,
) -> None:
    """Compare base and adapter on the run's held-out test split; writes eval_report.md and eval_report.json."""
    _print_eval(run_dir, url, api_key, base_model, adapter_model)


def _print_eval(run_dir: Path, url: str, api_key: str | None, base_model: str | None, adapter_model: str | None) -> None:
    import openai

    from quiver.training.evaluate import evaluate_run

    try:
        report = evaluate_run(run_dir, url, api_key=api_key, base_model=base_model, adapter_model=adapter_model)
    except openai.OpenAIError as exc:
        err_console.print(f"[red]evaluation failed: {exc}")
        raise typer.Exit(1) from exc
    table = Table(title=f"{run_dir.name}: base vs adapter on the test split")
    table.add_column("metric")
    table.add_column(report["models"]["base"])
    table.add_column(report["models"]["adapter"])
    base, adapter = report["metrics"]["base"], report["metrics"]["adapter"]
    for metric in base:
        table.add_row(metric, str(base[metric]), str(adapter[metric]))
    console.print(table)
    console.print(f"report: {run_dir / 'eval_report.md'}")


def merge_command(
    run_dir: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="a training run folder")],
    out: Annotated[Path, typer.Option(help="where to write the merged checkpoint")],
    base_model: Annotated[Optional[Path], typer.Option(help="HF model folder; default: the one the run recorded")] = None,
) -> None:
    """Merge the adapter into its base model: a standalone Hugging Face checkpoint."""
    from quiver.training.merge import merge_adapter

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    console.print(f"[green]merged checkpoint written to {merge_adapter(run_dir, out, base_model)}")


def register_commands(app: typer.Typer) -> None:
    data_app = typer.Typer(help="Check training data.", no_args_is_help=True)
    data_app.command("check")(data_check)
    app.add_typer(data_app, name="data")
    app.command("train")(_with_hyperparameter_options(train_command))
    app.command("eval")(eval_command)
    app.command("merge")(merge_command)
