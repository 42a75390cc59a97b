"""`diffvoice chat` end to end through the CLI with piped stdin and tiny models."""

from __future__ import annotations

import io
import re

import pytest
from helpers.tiny_ckpt import write_diffvoice_checkpoint

from agent import cli
from llm.engine import DiffusionEngine

SMALL = ["--set", "llm.decode.max_new_tokens=8", "--set", "llm.decode.block_length=4"]
STATS = re.compile(r"\[(\d+) denoising steps, (\d+) tokens, first span \d+ ms, total \d+ ms, "
                   r"(eot|length)\]")


def _chat(monkeypatch, capsys, stdin: str, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    rc = cli.main(["chat", *args, *SMALL])
    out, err = capsys.readouterr()
    return rc, out, err


def test_random_tiny_smoke_run(monkeypatch, capsys):
    rc, out, _ = _chat(monkeypatch, capsys, "hello there\nhow are you?\n/quit\n", "--random-tiny")
    assert rc == 0
    stats = STATS.findall(out)
    assert len(stats) == 2  # one line per reply
    for steps, tokens, _reason in stats:
        assert 1 <= int(steps) and 1 <= int(tokens) <= 8
    assert out.count("bot> ") == 2


def _record_prompts(monkeypatch) -> list[list[dict]]:
    """The messages of every request the chat makes of the engine, in order."""
    calls: list[list[dict]] = []
    original = DiffusionEngine.stream

    def spy(self, messages, **kw):
        calls.append([dict(m) for m in messages])
        return original(self, messages, **kw)

    monkeypatch.setattr(DiffusionEngine, "stream", spy)
    return calls


def test_multi_turn_history_and_reset(monkeypatch, capsys, tmp_path):
    write_diffvoice_checkpoint(tmp_path / "m")
    calls = _record_prompts(monkeypatch)
    rc, out, _ = _chat(monkeypatch, capsys, "first\n\nsecond\n/reset\nthird\n",
                       "--model", str(tmp_path / "m"), "--spans")
    assert rc == 0 and len(STATS.findall(out)) == 3
    warm_up, calls = calls[0], calls[1:]  # a throwaway reply before the first prompt
    assert [m["role"] for m in warm_up] == ["user"]
    assert [m["role"] for m in calls[1]] == ["system", "user", "assistant", "user"]
    assert calls[1][1]["content"] == "first" and calls[1][3]["content"] == "second"
    assert [m["content"] for m in calls[2][1:]] == ["third"]  # /reset forgot the rest
    assert re.search(r"\[\s*\d+ ms, step\s+\d+\]", out)  # --spans timing lines


def test_a_message_too_long_for_the_model_is_refused_and_the_chat_goes_on(monkeypatch, capsys,
                                                                         tmp_path):
    write_diffvoice_checkpoint(tmp_path / "m")
    calls = _record_prompts(monkeypatch)
    long = " ".join(["words"] * 3000)  # past any K/V capacity of the tiny model
    rc, out, _ = _chat(monkeypatch, capsys, f"first\n{long}\nsecond\n", "--model",
                       str(tmp_path / "m"))
    assert rc == 0 and "(no reply: prompt of" in out and len(STATS.findall(out)) == 2
    # the refused message is not part of the conversation the next reply sees
    assert [m["content"] for m in calls[-1] if m["role"] == "user"] == ["first", "second"]


def test_missing_model_is_a_clear_error(monkeypatch, capsys, tmp_path):
    rc, _, err = _chat(monkeypatch, capsys, "hi\n", "--model", str(tmp_path / "absent"))
    assert rc == 2 and "model folder not found" in err and "--random-tiny" in err


@pytest.mark.parametrize("stdin", ["", "/quit\n"])
def test_eof_or_quit_ends_without_a_reply(monkeypatch, capsys, stdin):
    rc, out, _ = _chat(monkeypatch, capsys, stdin, "--random-tiny")
    assert rc == 0 and "bot> " not in out


class _CtrlCAfter(io.StringIO):
    """A terminal whose user types the given lines, then presses Ctrl-C at the prompt."""

    def readline(self, *args) -> str:
        line = super().readline(*args)
        if not line:
            raise KeyboardInterrupt
        return line


def test_ctrl_c_at_the_prompt_ends_the_chat_like_eof(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", _CtrlCAfter("hello there\n"))
    rc = cli.main(["chat", "--random-tiny", *SMALL])  # no traceback: a KeyboardInterrupt fails
    out, _ = capsys.readouterr()
    assert rc == 0 and out.count("bot> ") == 1
