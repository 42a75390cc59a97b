"""Settings: TOML < environment < --set, unknown keys rejected everywhere, named configs."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent import cli
from agent.settings import CONFIG_DIR, Settings, load_settings, resolve_config_path
from llm.settings import DecodeSettings, parse_override


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in os.environ:
        if name.upper().startswith("DIFFVOICE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def toml(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[llm]\ndevice = "cuda"\nmodel = "from-file"\n'
                    "[llm.decode]\nthreshold = 0.5\nblock_length = 8\n")
    return path


def test_default_config_is_the_shipped_deployment():
    data = tomllib.loads((CONFIG_DIR / "default.toml").read_text())
    s = load_settings()
    assert s.llm.model == "dv-small"
    # what the file sets is taken; the rest of the section keeps the model defaults
    assert s.llm.decode == DecodeSettings(**data["llm"]["decode"])
    assert load_settings("default") == s
    # and it sets only what differs from them: a restated default would outlive its change
    restated = [key for key, value, default in _leaves(data, Settings()) if value == default]
    assert not restated, restated


def _leaves(table: dict, defaults, prefix: str = ""):
    for key, value in table.items():
        if isinstance(value, dict):
            yield from _leaves(value, getattr(defaults, key), f"{prefix}{key}.")
        else:
            yield prefix + key, value, getattr(defaults, key)


def test_file_then_environment_then_overrides(monkeypatch, toml):
    s = load_settings(str(toml))
    assert (s.llm.device, s.llm.model, s.llm.decode.threshold) == ("cuda", "from-file", 0.5)
    monkeypatch.setenv("DIFFVOICE_LLM__DEVICE", "cpu")
    monkeypatch.setenv("DIFFVOICE_LLM__DECODE__THRESHOLD", "0.7")
    s = load_settings(str(toml))
    assert (s.llm.device, s.llm.decode.threshold) == ("cpu", 0.7)  # env beats the file
    assert s.llm.model == "from-file" and s.llm.decode.block_length == 8
    s = load_settings(str(toml), ["llm.decode.threshold=0.95", "llm.model=over"])
    assert (s.llm.decode.threshold, s.llm.model, s.llm.device) == (0.95, "over", "cpu")


def test_override_values_parse_as_toml_scalars():
    assert parse_override("llm.decode.block_length=16") == (["llm", "decode", "block_length"], 16)
    assert parse_override("llm.model=dv-small") == (["llm", "model"], "dv-small")
    assert parse_override('server.allowed_origins=["https://a"]')[1] == ["https://a"]
    s = load_settings(None, ["llm.decode.temperature=0.3", "llm.engine.compile=true"])
    assert s.llm.decode.temperature == 0.3 and s.llm.engine.compile is True
    with pytest.raises(ValueError, match="section.key=value"):
        parse_override("llm.model")


def test_unknown_keys_in_the_file(tmp_path):
    for text in ('[llm]\nmodle = "x"\n', 'typo = 1\n', "[llm.decode]\nthreshhold = 0.5\n"):
        path = tmp_path / "bad.toml"
        path.write_text(text)
        with pytest.raises(ValidationError):
            load_settings(str(path))


@pytest.mark.parametrize("name", ["DIFFVOICE_LMM__DEVICE", "DIFFVOICE_LLM__DEVISE",
                                  "DIFFVOICE_LLM__DECODE__THRESHHOLD"])
def test_unknown_keys_in_the_environment(monkeypatch, name):
    monkeypatch.setenv(name, "1")
    with pytest.raises(ValueError):
        load_settings()


@pytest.mark.parametrize("item", ["llm.modle=x", "nothing.here=1", "llm.decode.steps=8"])
def test_unknown_keys_in_overrides(item):
    with pytest.raises(ValueError):
        load_settings(None, [item])


def test_invalid_values_are_rejected():
    with pytest.raises(ValidationError):
        load_settings(None, ["llm.decode.threshold=1.5"])
    with pytest.raises(ValidationError):
        load_settings(None, ["llm.engine.cache=sometimes"])


def test_named_config_resolution(toml):
    assert resolve_config_path("default") == CONFIG_DIR / "default.toml"
    assert resolve_config_path(str(toml)) == toml
    with pytest.raises(FileNotFoundError, match="named configs: .*default"):
        resolve_config_path("no-such-config")
    with pytest.raises(FileNotFoundError):
        resolve_config_path(str(toml.parent / "absent.toml"))


def test_a_config_states_only_what_it_changes_over_its_base(tmp_path, toml):
    variant = tmp_path / "variant.toml"
    variant.write_text(f'base = "{toml}"\n[llm.decode]\nblock_length = 32\n'
                       '[session]\nturn_detector = "vad"\n')
    s, below = load_settings(str(variant)), load_settings(str(toml))
    assert s.llm.decode.block_length == 32 and s.session.turn_detector == "vad"
    # the rest of each table comes from the base, and a base of a base is followed
    assert s.llm.model == "from-file" and s.llm.decode.threshold == below.llm.decode.threshold
    deeper = tmp_path / "deeper.toml"
    deeper.write_text(f'base = "{variant}"\n[llm]\nmodel = "other"\n')
    d = load_settings(str(deeper))
    assert d.llm.model == "other" and d.llm.decode.block_length == 32 and d.llm.device == "cuda"


def test_bench_variants_are_the_default_plus_their_change():
    default = load_settings("default")
    assert load_settings("bench-diffusion") == default
    low = load_settings("bench-endpoint-low")
    assert low.session.turn_end_threshold == 0.2
    assert low.llm == default.llm and low.asr == default.asr and low.tts == default.tts


def test_a_base_loop_or_a_bad_base_is_a_clear_error(tmp_path):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text(f'base = "{b}"\n')
    b.write_text(f'base = "{a}"\n')
    with pytest.raises(ValueError, match="its own base"):
        load_settings(str(a))
    a.write_text("base = 3\n")
    with pytest.raises(ValueError, match="base must be"):
        load_settings(str(a))
    a.write_text('base = "no-such-config"\n')
    with pytest.raises(FileNotFoundError, match="no-such-config"):
        load_settings(str(a))


def test_cli_reports_bad_settings(capsys):
    assert cli.main(["chat", "--set", "llm.nope=1"]) == 2
    assert "bad settings" in capsys.readouterr().err
    assert cli.main(["chat", "--config", "no-such-config"]) == 2


@pytest.mark.parametrize(("argv", "said"), [
    (["bench-llm", "--prompt-tokens", "-5"], "--prompt-tokens must be at least 1"),
    (["bench-llm", "--sessions", "0", "--repeats", "0"], "--sessions, --repeats must be"),
    (["bench", "--turns", "-1"], "--turns must be >= 0"),
    (["bench", "--sessions", "0"], "--sessions must be >= 1"),
    (["train", "--recipe", "no-such-recipe"], "'no-such-recipe' not found"),
    (["train", "--opt", "lr=abc"], "lr"),
    (["distill", "--examples", "0"], "examples"),
    (["eval-model", "--examples", "0"], "examples"),
    (["eval-model", "--data-dir", "no-such-data"], "no prepared data"),
    (["bench-llm", "--model", "no-such-model"], "no checkpoint for --model no-such-model"),
    (["train", "--data-dir", "no-such-data"], "no prepared data in no-such-data"),
    (["distill", "--data-dir", "no-such-data"], "no prepared data in no-such-data"),
    (["bench-turns", "--turns", "-3"], "--turns must be at least 1"),
    (["bench-turns", "--noise-dbfs", "20"], "--noise-dbfs must be at most -20"),
    (["bench-turns", "--set", 'session.turn_detector="vad"'], "no model to score"),
])
def test_a_commands_bad_option_is_a_message_and_exit_2(argv, said, capsys):
    """Refused before any model loads or any work starts: no traceback, nothing lost."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err


def test_defaults_are_written_once():
    # the root model builds every section from its own defaults, so both routes agree
    assert Settings().llm.decode == DecodeSettings()


def test_the_command_list_imports_no_command(tmp_path):
    # `diffvoice --help` lists every command without importing one (torch, LiveKit, aiortc: ~5 s)
    code = ("import sys; from agent import cli; cli.main(['--help']); "
            "print(sorted(m for m, _ in cli.COMMANDS.values() if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parent.parent)
    assert "distill  " in done.stdout and done.stdout.strip().endswith("[]"), done.stdout
