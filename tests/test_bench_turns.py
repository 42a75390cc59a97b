"""`diffvoice bench-turns`: cut points, the separation measure, and the command on real models
(Piper speaks, the session's Silero VAD finds the moment to ask; LiveKit's v1-mini scores the
audio, or our text detector Whisper's transcript of it)."""

from __future__ import annotations

import json

import numpy as np

from agent import bench_turns as bt
from agent.cli import main
from agent.clients import MIC_RATE
from agent.turn_detector import TextTurnDetector


def test_cut_words_keep_some_words_and_never_all():
    assert bt.cut_words("Can you recommend a good book to read?") == [3, 6]
    assert bt.cut_words("Do you like music?") == [2, 3]
    assert bt.cut_words("Hello.") == []
    assert bt.prefix("Okay, goodbye for now.", 1) == "Okay"


def test_quiet_cut_ends_at_the_quiet_gap_near_the_share():
    tone = (8000 * np.sin(np.arange(MIC_RATE // 2) / 5)).astype(np.int16)
    gap = np.zeros(MIC_RATE // 10, np.int16)
    pcm = np.concatenate([tone, gap, tone])  # a word, 100 ms of silence, a word
    cut = bt.quiet_cut(pcm, 0.5)
    assert len(tone) <= len(cut) <= len(tone) + len(gap)
    assert abs(int(cut[-1])) < 10  # faded out


def test_auc_counts_how_often_complete_scores_above_cut():
    assert bt.auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert bt.auc([0.1], [0.9]) == 0.0
    assert bt.auc([0.5], [0.5]) == 0.5


def test_bench_turns_command_scores_real_turns(tmp_path, capsys):
    out = tmp_path / "turns.json"
    rc = main(["bench-turns", "--turns", "2", "--json", str(out), "--config",
               "bench-endpoint-audio"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "ROC AUC" in printed and "<- in use" in printed
    report = json.loads(out.read_text())
    assert report["settings"] == {**report["settings"], "turn_detector": "v1-mini",
                                  "threshold": 0.25}  # configs/bench-endpoint-audio
    clips = report["clips"]
    assert {c["kind"] for c in clips} == {"complete", "prefix", "cut"}
    assert {c["condition"] for c in clips} == {"digital", "noise"}
    scored = [c for c in clips if c["p_end"] is not None]
    assert len(scored) >= 0.9 * len(clips)
    # asked after the VAD counted its 200 ms of silence (less the lag of the last loud sample)
    assert all(0.0 <= c["p_end"] <= 1.0 and c["silence_s"] > 0.1 for c in scored)
    for condition in report["conditions"].values():
        assert 0.0 <= condition["auc"] <= 1.0
        rows = condition["thresholds"]
        held = [r["complete_held"] for r in rows]
        assert held == sorted(held)  # a higher threshold holds at least as many turns


def test_bench_turns_scores_the_text_detector_on_whisper_transcripts(tmp_path, capsys):
    out = tmp_path / "turns.json"
    rc = main(["bench-turns", "--turns", "1", "--json", str(out)])  # the deployment's detector
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert printed.count("<- in use") == 2  # the head's threshold, in both conditions' tables
    report = json.loads(out.read_text())
    assert report["settings"]["turn_detector"] == "text"
    detector = TextTurnDetector.load("dv-small-ar")
    detector.close()
    assert detector.scorer.head is not None  # the shipped head's own threshold
    assert report["settings"]["threshold"] == detector.threshold
    scored = [c for c in report["clips"] if c["p_end"] is not None]
    assert scored and all(c["transcript"] for c in scored)
    # "Hi there, how are you doing today?" heard whole ends the turn; its first words do not
    complete = [c["p_end"] for c in scored if c["kind"] == "complete"]
    shortest = [c["p_end"] for c in scored if c["words"] == min(x["words"] for x in scored)]
    assert min(complete) > max(shortest)
