"""`diffvoice bench-llm` on a tiny random shape: it runs both models and writes the JSON keys."""

from __future__ import annotations

import json

from agent.cli import main

TOP_KEYS = {"machine", "model", "settings", "diffusion", "ar", "ratio", "weight_read",
            "sessions", "agreement"}
RUN_KEYS = {"ms_per_step", "tokens_per_forward", "ttfs_ms", "reply_ms", "tokens_per_s",
            "reply_tokens", "nfe"}


def test_bench_llm_tiny_shape_writes_documented_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench-llm", "--preset", "cpu-default", "--random", "--shape", "tiny",
            "--prompt-tokens", "24", "--reply-tokens", "16", "--block-length", "8",
            "--tokens-per-step", "4", "--sessions", "3", "--repeats", "1",
            "--bandwidth-gbs", "10", "--json", str(out), "--profile", str(tmp_path / "p.txt")]
    assert main(argv) == 0
    r = json.loads(out.read_text())
    assert TOP_KEYS <= set(r)
    assert RUN_KEYS <= set(r["diffusion"]) and RUN_KEYS <= set(r["ar"])
    assert "peak_mem_mb" in r["diffusion"]
    assert r["diffusion"]["reply_tokens"] == 16 and r["ar"]["reply_tokens"] == 16
    assert r["diffusion"]["tokens_per_forward"] > 1.0 and r["ar"]["tokens_per_forward"] == 1.0
    assert r["ratio"]["speed"] > 0 and r["weight_read"]["bound_ms"] > 0
    assert len(r["sessions"]["finished_ms"]) == 3 and len(r["sessions"]["cold_finished_ms"]) == 3
    assert r["sessions"]["cached_prompt_tokens"] > 0
    nt = r["diffusion"]["next_turn"]
    assert nt["cached_prompt_tokens"] >= 24 and nt["reply_tokens"] == 16
    assert r["diffusion"]["window_step_ms"] > 0 and r["diffusion"]["encode_ms"] > 0
    steps = (tmp_path / "p.txt").read_text()
    assert "3 sessions, next turn" in steps and "refresh" in steps
    assert 0.0 <= r["agreement"]["token_agreement"] <= 1.0
    assert "diffusion/AR" in capsys.readouterr().out


def test_cpu_default_measures_the_deployed_decoding(tmp_path):
    """The shipped models with the config's threshold decoding in blocks of 8, as the agent
    runs them; a fixed schedule only when asked for."""
    out = tmp_path / "bench.json"
    base = ["bench-llm", "--preset", "cpu-default", "--repeats", "1", "--sessions", "2"]
    assert main([*base, "--json", str(out)]) == 0
    s = json.loads(out.read_text())["settings"]
    assert (s["strategy"], s["block_length"], s["threshold"]) == ("threshold", 8, 0.5)
    assert main([*base, "--tokens-per-step", "4", "--json", str(out)]) == 0
    s = json.loads(out.read_text())["settings"]
    assert (s["strategy"], s["tokens_per_step"]) == ("fixed", 4)
