"""Server settings: command line, then HEADSWAP_* environment, then defaults; validation; secrets."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings, add_arguments, cli_fields, from_sources

FIELDS = list(Settings.model_fields)
CLI_FIELDS = [name for name in FIELDS if name != "admin_token"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headswap serve")
    add_arguments(parser)
    return parser


def _settings(*argv: str, **env: str) -> Settings:
    return from_sources(_parser().parse_args(list(argv)), env)


# --- precedence and parsing --------------------------------------------------------------------

def test_nothing_given_is_every_default() -> None:
    assert _settings() == Settings()
    assert Settings().port == 8000 and Settings().max_batch_size == 16 and Settings().device == "auto"


def test_cli_beats_env_beats_default() -> None:
    assert _settings().port == 8000
    assert _settings(HEADSWAP_PORT="9000").port == 9000
    assert _settings("--port", "9100", HEADSWAP_PORT="9000").port == 9100
    assert _settings("--port", "9100").port == 9100


def test_cli_value_equal_to_the_default_still_beats_env() -> None:
    assert _settings("--port", "8000", HEADSWAP_PORT="9000").port == 8000
    assert _settings("--checkpoint-dir", "", HEADSWAP_CHECKPOINT_DIR="/ckpts").checkpoint_dir == ""


def test_env_values_are_parsed_by_field_type() -> None:
    settings = _settings(HEADSWAP_MAX_BATCH_SIZE="32", HEADSWAP_BATCH_TIMEOUT_MS="5.5", HEADSWAP_HOST="0.0.0.0",
                         HEADSWAP_DEVICE="cpu", HEADSWAP_GUARD_MIN_AGREEMENT="0.9", HEADSWAP_TIMEOUT_S="7")
    assert settings.max_batch_size == 32 and type(settings.max_batch_size) is int
    assert settings.batch_timeout_ms == 5.5 and type(settings.batch_timeout_ms) is float
    assert settings.timeout_s == 7.0 and type(settings.timeout_s) is float
    assert settings.host == "0.0.0.0"
    assert settings.device == "cpu"
    assert settings.guard_min_agreement == 0.9


def test_cli_values_are_parsed_by_field_type() -> None:
    settings = _settings("--max-batch-size", "4", "--batch-timeout-ms", "0.5", "--checkpoint", "a/b.pt",
                         "--log-level", "debug")
    assert (settings.max_batch_size, settings.batch_timeout_ms, settings.checkpoint, settings.log_level) == (
        4, 0.5, "a/b.pt", "debug")


def test_env_names_are_the_upper_case_field_names() -> None:
    env = {f"HEADSWAP_{name.upper()}": "" for name in ("checkpoint", "model_name", "state_dir")}
    env.update(HEADSWAP_CHECKPOINT="x.safetensors", HEADSWAP_MODEL_NAME="m", HEADSWAP_STATE_DIR="/state")
    settings = from_sources(_parser().parse_args([]), env)
    assert (settings.checkpoint, settings.model_name, settings.state_dir) == ("x.safetensors", "m", "/state")


def test_unrelated_env_is_ignored() -> None:
    assert _settings(PORT="1", HEADSWAP_PORTS="2", headswap_port="3") == Settings()


@pytest.mark.parametrize(("env", "value", "message"), [
    ("HEADSWAP_PORT", "abc", "HEADSWAP_PORT='abc' is not a valid int"),
    ("HEADSWAP_PORT", "80.0", "HEADSWAP_PORT='80.0' is not a valid int"),
    ("HEADSWAP_PORT", "", "HEADSWAP_PORT='' is not a valid int"),
    ("HEADSWAP_TIMEOUT_S", "soon", "HEADSWAP_TIMEOUT_S='soon' is not a valid float"),
    ("HEADSWAP_GUARD_WINDOW", "2e2", "HEADSWAP_GUARD_WINDOW='2e2' is not a valid int"),
])
def test_bad_env_value_says_which_variable(env: str, value: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        _settings(**{env: value})
    assert str(info.value) == message


def test_bad_env_value_is_ignored_when_the_cli_gives_one() -> None:
    assert _settings("--port", "1234", HEADSWAP_PORT="abc").port == 1234


def test_environ_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADSWAP_MAX_IMAGE_BYTES", "1000")
    monkeypatch.setenv("HEADSWAP_ADMIN_TOKEN", "from-env")
    settings = from_sources(_parser().parse_args([]))
    assert settings.max_image_bytes == 1000
    assert settings.admin_token == "from-env"


def test_missing_attributes_on_the_namespace_fall_back() -> None:
    assert from_sources(argparse.Namespace(), {"HEADSWAP_PORT": "9"}) == Settings(port=9)


# --- the command line --------------------------------------------------------------------------

def test_every_field_but_the_token_is_an_option() -> None:
    actions = {a.dest: a for a in _parser()._actions if a.help != argparse.SUPPRESS and a.dest != "help"}
    assert sorted(actions) == sorted(CLI_FIELDS)
    for name, action in actions.items():
        assert action.option_strings == [f"--{name.replace('_', '-')}"]
        assert action.default is None  # unset, so the environment can fill in
        default = Settings.model_fields[name].default
        assert f"[env HEADSWAP_{name.upper()}; default {default!r}]" in action.help


def test_choices_are_enforced_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(["--device", "tpu"])
    assert info.value.code == 2
    assert "argument --device: invalid choice: 'tpu' (choose from" in capsys.readouterr().err


def test_bad_cli_number_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(["--port", "eighty"])
    assert info.value.code == 2
    assert "argument --port: invalid int value: 'eighty'" in capsys.readouterr().err


def test_admin_token_is_not_in_help_nor_taken_from_the_namespace() -> None:
    text = _parser().format_help()
    assert "--admin-token-file" in text
    assert re.search(r"--admin-token(?!-file)", text) is None
    # a namespace that somehow has admin_token (not an option) does not set it
    args = argparse.Namespace(admin_token="from-cli")
    assert from_sources(args, {}).admin_token == ""
    assert from_sources(args, {"HEADSWAP_ADMIN_TOKEN": "from-env"}).admin_token == "from-env"


def test_admin_token_on_the_command_line_is_refused() -> None:
    from service.cli import build_parser

    with pytest.raises(SystemExit):
        args = build_parser().parse_args(["serve", "--checkpoint", "a.pt", "--admin-token", "s3cret"])
        assert args.admin_token_file != "s3cret"


def test_token_is_not_in_repr() -> None:
    settings = Settings(admin_token="s3cret-token")
    assert "s3cret-token" not in repr(settings)
    assert "admin_token_file=''" in repr(settings)


def test_settings_are_frozen() -> None:
    with pytest.raises(ValidationError, match="frozen"):
        Settings().port = 1  # type: ignore[misc]


def test_cli_fields_are_every_field_but_the_token() -> None:
    assert cli_fields() == CLI_FIELDS


# --- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize(("changes", "message"), [
    ({"workers_per_device": -1}, "workers_per_device must be >= 0 (0: automatic), found -1"),
    ({"max_batch_size": 0}, "max_batch_size must be >= 1, found 0"),
    ({"batch_timeout_ms": -1.0}, "batch_timeout_ms must be >= 0 and timeout_s > 0"),
    ({"timeout_s": 0.0}, "batch_timeout_ms must be >= 0 and timeout_s > 0"),
    ({"port": 65536}, "port must be within 1-65535, found 65536"),
    ({"port": -1}, "port must be within 1-65535, found -1"),
    ({"port": 0}, "port must be within 1-65535, found 0"),
    ({"admin_port": 65536}, "admin_port must be within 0-65535 (0: off), found 65536"),
    ({"device": "tpu"}, "device must be one of auto, cpu, cuda, found 'tpu'"),
    ({"precision": "int8"}, "precision must be one of auto, fp32, bf16, fp16, found 'int8'"),
    ({"log_level": "INFO"}, "log_level must be one of debug, info, warning, error, found 'INFO'"),
    ({"model": ["glyphs"]}, "model must be NAME=CHECKPOINT with NAME 1-64 of A-Z a-z 0-9 _ . -, found 'glyphs'"),
    ({"model": ["bad name=a.pt"]}, "model must be NAME=CHECKPOINT with NAME 1-64 of A-Z a-z 0-9 _ . -, found 'bad name=a.pt'"),
    ({"model": ["g=a.pt", "g=b.pt"]}, "model name 'g' is given twice"),
    ({"model_name": "g", "model": ["g=b.pt"]}, "model name 'g' is given twice"),
    ({"memory_budget_mb": -1.0}, "memory_budget_mb must be >= 0 (0: no bound), found -1.0"),
    ({"metrics_max_models": 0}, "metrics_max_models must be >= 1, found 0"),
    ({"worker_nice": 20}, "worker_nice must be within 0-19, found 20"),
    ({"worker_nice": -1}, "worker_nice must be within 0-19, found -1"),
])
def test_validation_message(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        Settings(**changes)  # type: ignore[arg-type]
    assert str(info.value) == message


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ValueError) as info:
        Settings(workers_per_device=-1, max_batch_size=-3, port=70000, device="gpu")
    assert str(info.value) == ("workers_per_device must be >= 0 (0: automatic), found -1; max_batch_size must be >= 1, found -3; "
                               "port must be within 1-65535, found 70000; "
                               "device must be one of auto, cpu, cuda, found 'gpu'")


def test_bad_choice_from_the_environment_is_refused() -> None:
    with pytest.raises(ValueError) as info:
        _settings(HEADSWAP_DEVICE="tpu")
    assert str(info.value) == "device must be one of auto, cpu, cuda, found 'tpu'"
    with pytest.raises(ValueError, match=r"^workers_per_device must be >= 0 \(0: automatic\), found -1$"):
        _settings(HEADSWAP_WORKERS_PER_DEVICE="-1")


def test_boundary_values_are_accepted() -> None:
    settings = Settings(port=1, admin_port=0, metrics_port=65535, batch_timeout_ms=0.0, workers_per_device=1,
                        max_batch_size=1)
    assert (settings.port, settings.admin_port, settings.metrics_port) == (1, 0, 65535)
    assert Settings(port=65535).port == 65535


def test_guard_window_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="guard_window"):
        Settings(guard_window=0)


# --- admin secret ------------------------------------------------------------------------------

def test_admin_secret_from_the_env_field() -> None:
    assert _settings(HEADSWAP_ADMIN_TOKEN="tok-env").admin_secret() == "tok-env"
    assert _settings(HEADSWAP_ADMIN_TOKEN="tok-env\n").admin_secret() == "tok-env"  # a Secret with a newline


def test_admin_secret_from_a_token_file_strips_the_newline(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("  tok-file\n")
    assert _settings("--admin-token-file", str(path)).admin_secret() == "tok-file"
    assert _settings(HEADSWAP_ADMIN_TOKEN_FILE=str(path)).admin_secret() == "tok-file"


def test_env_token_beats_the_token_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("tok-file\n")
    assert _settings("--admin-token-file", str(path), HEADSWAP_ADMIN_TOKEN="tok-env").admin_secret() == "tok-env"


def test_no_token_means_admin_off() -> None:
    assert Settings().admin_secret() == ""


def test_missing_token_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Settings(admin_token_file=str(tmp_path / "absent")).admin_secret()


def test_admin_secret_is_the_first_line_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("tok-file\n# rotated 2026-01-01\n")
    assert Settings(admin_token_file=str(path)).admin_secret() == "tok-file"


# --- store -------------------------------------------------------------------------------------

def test_store_defaults_to_the_checkpoint_folder(tmp_path: Path) -> None:
    (tmp_path / "ckpts").mkdir()
    settings = Settings(checkpoint=str(tmp_path / "ckpts" / "model.safetensors"))
    assert settings.store == (tmp_path / "ckpts").resolve()


def test_relative_checkpoint_folder_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert Settings(checkpoint="ckpts/model.safetensors").store == (tmp_path / "ckpts").resolve()
    assert Settings(checkpoint="model.safetensors").store == tmp_path.resolve()
    assert Settings().store == tmp_path.resolve()


def test_checkpoint_dir_beats_the_checkpoint_folder(tmp_path: Path) -> None:
    settings = Settings(checkpoint=str(tmp_path / "a" / "model.pt"), checkpoint_dir=str(tmp_path / "store"))
    assert settings.store == (tmp_path / "store").resolve()
    assert _settings("--checkpoint", "/a/b/m.pt", HEADSWAP_CHECKPOINT_DIR=str(tmp_path)).store == tmp_path.resolve()


def test_models_are_repeatable_options_and_a_json_list_in_the_environment() -> None:
    settings = _settings("--model", "glyphs=store/glyphs.safetensors", "--model", "other=/abs/other.pt")
    assert settings.named_models == [("glyphs", "store/glyphs.safetensors"), ("other", "/abs/other.pt")]
    assert settings.store == Path("store").resolve()  # the first model's folder, without --checkpoint
    assert _settings(HEADSWAP_MODEL='["a=x.pt"]').named_models == [("a", "x.pt")]
    assert _settings("--memory-budget-mb", "60").memory_budget_bytes == 60 * 2**20
