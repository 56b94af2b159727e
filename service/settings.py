"""Typed server settings, read in one place: command line first, then HEADSWAP_<OPTION>, then defaults.

``Settings`` is a pydantic-settings model: each field becomes ``--field-name`` (argparse, so
``--help`` shows every default) and is read from ``HEADSWAP_FIELD_NAME`` (exactly that name,
upper case); the command line is handed over as init values, which win over the environment.
``main()`` builds one ``Settings`` and passes it down. Nothing else reads the environment.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pydantic import AliasGenerator, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

DEVICES = ("auto", "cpu", "cuda")
MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # a served model's name: in URL paths and metric labels
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*")  # pydantic alone would take "80.0" for an int
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("headswap_environ", default=None)


def env_name(field: str) -> str:
    return f"HEADSWAP_{field.upper()}"


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None, cli: bool = True) -> Any:  # noqa: A002
    return Field(default, description=help, json_schema_extra={"choices": list(choices) if choices else None, "cli": cli})


class _Environment(EnvSettingsSource):
    """The environment source, reading ``from_sources``' mapping where one is given."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        environ = _ENVIRON.get()
        return dict(os.environ if environ is None else environ)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        case_sensitive=True, frozen=True, extra="forbid", validate_by_name=True, validate_by_alias=True,
        alias_generator=AliasGenerator(validation_alias=env_name),
    )

    checkpoint: str = _opt("", "checkpoint to serve (.safetensors or .pt), as one model named after its metadata")
    model: list[str] = _opt([], "serve a checkpoint as model NAME: NAME=CHECKPOINT, repeatable (env: a JSON list); the "
                            "first model given (--checkpoint, else the first --model) is the default one, POST /predict")
    host: str = _opt("127.0.0.1", "address to listen on")
    port: int = _opt(8000, "port to listen on")
    model_name: str = _opt("", "model name in answers and V2 paths (default: the checkpoint's name)")
    checkpoint_dir: str = _opt("", "checkpoint store for later loads (default: the checkpoint's folder)")
    workers_per_device: int = _opt(0, "inference worker processes per device (0: one per core with one thread "
                                   "each on CPU, one per GPU)")
    max_batch_size: int = _opt(16, "most images in one forward pass")
    batch_timeout_ms: float = _opt(2.0, "how long a worker waits to fill a batch once it has one image, while more are on their way")
    device: str = _opt("auto", "where the model runs", DEVICES)
    precision: str = _opt("auto", "inference precision (auto: bf16 on CUDA, fp32 on CPU)", PRECISIONS)
    max_image_bytes: int = _opt(20 * 1024 * 1024, "largest accepted image (and request body), in bytes")
    max_image_pixels: int = _opt(40_000_000, "largest accepted image, in pixels (decompression bombs)")
    timeout_s: float = _opt(30.0, "longest a request may wait for its answer before a 504 (a request's "
                            "X-Request-Timeout-Ms header, or V2 parameters.timeout in microseconds, may shorten it)")
    max_queue: str = _opt("auto", "most images admitted and waiting for a worker, summed over the server; a request "
                          "over it is answered 503 at once, with Retry-After. auto: bounds the images in the server "
                          "instead (waiting or running), to what the workers answer in about 1 s at the drain rate "
                          "measured while serving, so that an admitted image is answered in about a second, far "
                          "within --timeout-s; at least two full batches per worker (one running, one waiting) so "
                          "none waits for work, at most 1024 (e.g. 64 for resnet18 on 2 CPU cores: 2 workers x 2 "
                          "batches of 16, answered in ~1.6 s at ~40 images/s); 0: unbounded")
    max_queue_wait_ms: float = _opt(0.0, "an image that waited longer than this for a worker is not run but answered "
                                    "503 (0: no limit but the request's deadline, --timeout-s)")
    api_servers: int = _opt(0, "API-server processes: HTTP, gRPC and decode threads, each its own event loop "
                            "(0: one per inference worker; Triton's --http-thread-count). On a GPU one worker is "
                            "faster than one API server can feed it")
    decode_threads: int = _opt(4, "image decode threads per API server process")
    worker_nice: int = _opt(5, "niceness the inference workers add to their own (0-19): where they share cores with "
                            "the API servers, the event loop and decode threads go first, so that refusals, probes and "
                            "the next batch's images are not kept waiting behind a forward pass (0: equal shares)")
    decode_on: str = _opt("api", "where plain JPEGs are decoded and resized: api (the API servers' decode threads) or "
                          "worker (the inference worker, on its device: nvJPEG on a GPU; other images stay with the "
                          "API servers)", ("api", "worker"))
    log_level: str = _opt("info", "log level", ("debug", "info", "warning", "error"))
    access_log: str = _opt("off", "log a line per HTTP request (uvicorn's access log); off by default: every request "
                           "pays for it in API-server CPU (an early 503 costs about a third more)", ("on", "off"))
    admin_token_file: str = _opt("", "file holding the admin API bearer token (or set HEADSWAP_ADMIN_TOKEN); none: admin off")
    admin_port: int = _opt(0, "serve /admin on this separate port only (0: on the main port)")
    metrics_port: int = _opt(0, "also serve /metrics on this separate port (0: main port only)")
    grpc_port: int = _opt(0, "serve the KServe V2 protocol over gRPC (inference.GRPCInferenceService) and gRPC health "
                          "(grpc.health.v1) on this port, beside HTTP (0: off)")
    rollout_file: str = _opt("", "JSON/YAML rollout spec to converge to and watch (fleet source of truth)")
    state_dir: str = _opt("", "folder for persisted slot choices and the audit log")
    guard_window: int = _opt(200, "canary guard: judge the last N canary requests / shadow comparisons")
    guard_max_error_rate: float = _opt(0.05, "canary guard: roll back above this canary error rate")
    guard_min_agreement: float = _opt(0.0, "canary guard: roll back below this shadow top-1 agreement (0: off)")
    memory_budget_mb: float = _opt(0.0, "each inference worker's resident weights (backbones and heads, bytes of tensors) "
                                   "at most this many MiB: over it, the least recently used idle model is evicted and "
                                   "loaded again when a request needs it; a model that cannot fit alone is refused at "
                                   "load (0: no bound)")
    metrics_max_models: int = _opt(100, "models with a metrics label of their own (the default model first, then by "
                                   "name); the rest share the label model=\"other\"")
    drain_timeout_s: float = _opt(30.0, "on SIGTERM, longest wait for in-flight requests")
    swap_timeout_s: float = _opt(120.0, "longest wait for every worker to switch to new weights")
    # Not an option: a token on the command line shows in `ps`. From HEADSWAP_ADMIN_TOKEN or the file.
    admin_token: str = Field("", repr=False, json_schema_extra={"cli": False})

    def __init__(self, **values: Any) -> None:
        """Raises ValueError with one line naming every problem (pydantic's report, in our words)."""
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ValueError(_problems(exc)) from None

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _Environment(settings_cls)

    @field_validator("*", mode="before")
    @classmethod
    def _whole_numbers(cls, value: Any, info: Any) -> Any:
        if isinstance(value, str) and cls.model_fields[info.field_name].annotation is int \
                and not _INTEGER.fullmatch(value):
            raise ValueError("not a whole number")
        return value

    def admin_secret(self) -> str:
        """The admin token: HEADSWAP_ADMIN_TOKEN, else the first line of --admin-token-file, else ''."""
        if self.admin_token:
            return self.admin_token.strip()  # a Secret written with a trailing newline
        if self.admin_token_file:
            lines = Path(self.admin_token_file).read_text().strip().splitlines()
            return lines[0].strip() if lines else ""
        return ""

    @model_validator(mode="after")
    def _check(self) -> Settings:
        problems = []
        if self.workers_per_device < 0:
            problems.append(f"workers_per_device must be >= 0 (0: automatic), found {self.workers_per_device}")
        if self.api_servers < 0:
            problems.append(f"api_servers must be >= 0 (0: one per inference worker), found {self.api_servers}")
        if self.max_batch_size < 1:
            problems.append(f"max_batch_size must be >= 1, found {self.max_batch_size}")
        if self.batch_timeout_ms < 0 or self.timeout_s <= 0:
            problems.append("batch_timeout_ms must be >= 0 and timeout_s > 0")
        if self.queue_bound == -1:
            problems.append(f"max_queue must be auto or an integer >= 0 (0: unbounded), found {self.max_queue!r}")
        if self.max_queue_wait_ms < 0:
            problems.append(f"max_queue_wait_ms must be >= 0 (0: no limit), found {self.max_queue_wait_ms}")
        if not 0 <= self.worker_nice <= 19:
            problems.append(f"worker_nice must be within 0-19, found {self.worker_nice}")
        if self.memory_budget_mb < 0:
            problems.append(f"memory_budget_mb must be >= 0 (0: no bound), found {self.memory_budget_mb}")
        if self.metrics_max_models < 1:
            problems.append(f"metrics_max_models must be >= 1, found {self.metrics_max_models}")
        if self.guard_window < 1:
            problems.append(f"guard_window must be >= 1, found {self.guard_window}")
        if not (0 <= self.guard_max_error_rate <= 1 and 0 <= self.guard_min_agreement <= 1):
            problems.append("guard_max_error_rate and guard_min_agreement must be within [0, 1]")
        for name, lowest in (("port", 1), ("admin_port", 0), ("metrics_port", 0), ("grpc_port", 0)):  # 0: that listener is off
            value = getattr(self, name)
            if not lowest <= value <= 65535:
                problems.append(f"{name} must be within {lowest}-65535{' (0: off)' if lowest == 0 else ''}, found {value}")
        ports = [p for p in (self.port, self.admin_port, self.metrics_port, self.grpc_port) if p]
        if len(ports) != len(set(ports)):
            problems.append(f"port, admin_port, metrics_port and grpc_port must differ, found {self.port}, "
                            f"{self.admin_port}, {self.metrics_port}, {self.grpc_port}")
        for name in ("device", "precision", "log_level", "access_log"):
            choices = _choices(name)
            if getattr(self, name) not in choices:
                problems.append(f"{name} must be one of {', '.join(choices)}, found {getattr(self, name)!r}")
        problems += _model_problems(self.model, self.model_name)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def memory_budget_bytes(self) -> int:
        return int(self.memory_budget_mb * 2**20)

    @property
    def named_models(self) -> list[tuple[str, str]]:
        """``--model NAME=CHECKPOINT`` as (name, checkpoint) pairs, in order."""
        return [(name, checkpoint) for name, _, checkpoint in (entry.partition("=") for entry in self.model)]

    @property
    def queue_bound(self) -> int | None:
        """``max_queue`` as a number of images (0: unbounded); None for auto, or -1 when it is neither."""
        value = self.max_queue.strip().lower()
        if value == "auto":
            return None
        return int(value) if value.isdigit() else -1

    @property
    def store(self) -> Path:
        """The checkpoint store: ``checkpoint_dir``, else the served checkpoint's folder."""
        first = self.checkpoint or (self.named_models[0][1] if self.model else "")
        return Path(self.checkpoint_dir or Path(first).parent).resolve()


def server_version() -> str:
    """headswap's version, as the V2 server metadata reports it."""
    try:
        return version("headswap")
    except PackageNotFoundError:
        return "0+unknown"


def _model_problems(entries: list[str], model_name: str) -> list[str]:
    problems, names = [], [model_name] if model_name else []
    for entry in entries:
        name, eq, checkpoint = entry.partition("=")
        if not eq or not checkpoint or not MODEL_NAME.fullmatch(name):
            problems.append(f"model must be NAME=CHECKPOINT with NAME 1-64 of A-Z a-z 0-9 _ . -, found {entry!r}")
        elif name in names:
            problems.append(f"model name {name!r} is given twice")
        names.append(name)
    return problems


def _extra(name: str) -> dict[str, Any]:
    extra = Settings.model_fields[name].json_schema_extra
    return extra if isinstance(extra, dict) else {}


def _choices(name: str) -> tuple[str, ...] | None:
    choices = _extra(name).get("choices")
    return tuple(choices) if choices else None


def cli_fields() -> list[str]:
    """The settings that are command-line options (all but the admin token)."""
    return [name for name in Settings.model_fields if _extra(name).get("cli") is not False]


def _problems(exc: ValidationError) -> str:
    """One line for pydantic's errors: a value that is not of its field's type names its variable
    (only the environment can give one: argparse checks the command line); the rest are ours."""
    lines = []
    for error in exc.errors():
        if not error["loc"]:  # the model's own checks (_check)
            lines.append(str(error["ctx"]["error"]) if "ctx" in error else error["msg"])
            continue
        field = str(error["loc"][0]) if error["loc"] else ""
        name = field[len("HEADSWAP_"):].lower() if field.startswith("HEADSWAP_") else field
        annotation = Settings.model_fields[name].annotation if name in Settings.model_fields else None
        kind = getattr(annotation, "__name__", str(annotation))
        lines.append(f"{env_name(name)}={error['input']!r} is not a valid {kind}" if name else error["msg"])
    return "; ".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--option`` per settings field; defaults are left unset so env vars can fill in."""
    # else argparse takes --admin-token TOKEN as an abbreviation of --admin-token-file
    parser.add_argument("--admin-token", nargs="?", action=_RefuseToken, help=argparse.SUPPRESS)
    for name in cli_fields():
        info = Settings.model_fields[name]
        repeated = info.annotation == list[str]
        parser.add_argument(
            f"--{name.replace('_', '-')}", dest=name, type=str if repeated else info.annotation, default=None,
            choices=_choices(name), action="append" if repeated else "store",
            help=f"{info.description} [env {env_name(name)}; default {info.default!r}]",
        )


class _RefuseToken(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        parser.error("--admin-token is not an option (a token on the command line shows in `ps`): "
                     "set HEADSWAP_ADMIN_TOKEN or pass --admin-token-file")


def from_sources(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """Command line, then ``HEADSWAP_*`` environment (``environ``, else the process's), then field
    defaults. Raises ValueError."""
    given = {name: getattr(args, name, None) for name in cli_fields()}
    with _environment(environ):
        return Settings(**{name: value for name, value in given.items() if value is not None})


@contextmanager
def _environment(environ: Mapping[str, str] | None) -> Iterator[None]:
    token = _ENVIRON.set(environ)
    try:
        yield
    finally:
        _ENVIRON.reset(token)
