"""The phone transport: Twilio Media Streams parsing, mark-driven playout, and whole calls.

Protocol and playout tests are pure; call tests run the real `PhoneServer` on loopback with a
real `AgentSession` (Silero VAD, turn ending on silence) and a simulated caller speaking a
Piper-synthesised question in real time. Scripted STT/TTS/engine stand in where a test checks
the protocol rather than the models; one test uses the real speech models end to end.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from livekit import rtc

from agent import twilio_io as tw

sys.path.insert(0, str(Path(__file__).parent))
from twilio_caller import ulaw_decode, ulaw_encode  # noqa: E402

SID = "MZ0123"


def _media(payload: bytes, sid: str = SID) -> str:
    return json.dumps({"event": "media", "streamSid": sid,
                       "media": {"payload": base64.b64encode(payload).decode(),
                                 "timestamp": "20", "chunk": "1"}})


# -- protocol --------------------------------------------------------------------------------
def test_parse_start_reads_the_ids_parameters_and_format():
    msg = {"event": "start", "streamSid": SID, "start": {
        "streamSid": SID, "callSid": "CA9", "customParameters": {"token": "x", "n": 3},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}
    start = tw.parse_message(json.dumps(msg))
    assert start == tw.Start(SID, "CA9", {"token": "x", "n": "3"}, "audio/x-mulaw", 8000, 1)


def test_parse_media_dtmf_mark_stop():
    media = tw.parse_message(_media(b"\xff" * 160))
    assert isinstance(media, tw.Media) and media.payload == b"\xff" * 160 and media.chunk == 1
    dtmf = json.dumps({"event": "dtmf", "streamSid": SID, "dtmf": {"digit": "7"}})
    assert tw.parse_message(dtmf) == tw.Dtmf(SID, "7")
    mark = json.dumps({"event": "mark", "streamSid": SID, "mark": {"name": "0:1:160"}})
    assert tw.parse_message(mark) == tw.Mark(SID, "0:1:160")
    assert tw.parse_message(json.dumps({"event": "stop", "streamSid": SID})) == tw.Stop(SID)
    assert isinstance(tw.parse_message('{"event": "connected", "protocol": "Call"}'),
                      tw.Connected)


@pytest.mark.parametrize(("raw", "kind"), [
    (b"\x00\x01", "binary-frame"),
    ("{not json", "not-json"),
    ("[1, 2]", "not-json"),
    ('{"event": "hello"}', "unknown-event"),
    ('{"streamSid": "MZ0123"}', "unknown-event"),
    ('{"event": "media", "streamSid": "MZ0123", "media": {"payload": "@@@"}}', "bad-base64"),
    ('{"event": "media", "streamSid": "MZ0123", "media": {}}', "bad-field"),
    ('{"event": "media", "streamSid": "MZ0123"}', "bad-field"),
    (_media(b""), "bad-payload-size"),
    (_media(b"\x7f" * (tw.MAX_MEDIA_PAYLOAD_BYTES + 1)), "bad-payload-size"),
    ('{"event": "dtmf", "streamSid": "MZ0123", "dtmf": {"digit": "x"}}', "bad-dtmf"),
    ('{"event": "start", "start": {"streamSid": "MZ1"}}', "bad-field"),
])
def test_parse_rejects_malformed_frames_with_a_kind(raw, kind):
    with pytest.raises(tw.ProtocolError) as e:
        tw.parse_message(raw)
    assert e.value.kind == kind


def test_ulaw_codec_matches_an_independent_g711():
    everything = bytes(range(256))
    np.testing.assert_array_equal(tw.ulaw_to_pcm16(everything), ulaw_decode(everything))
    pcm = (np.sin(np.arange(8000) / 8000 * 2 * np.pi * 440) * 20000).astype(np.int16)
    ours = tw.ulaw_to_pcm16(tw.pcm16_to_ulaw(pcm)).astype(np.int32)
    theirs = ulaw_decode(ulaw_encode(pcm)).astype(np.int32)
    # both quantise to the same 256 levels; they may round a sample to the next level
    assert np.abs(ours - pcm).max() <= np.abs(theirs - pcm).max()
    assert np.abs(ours - pcm).max() < 700


# -- playout driven by echoed marks -----------------------------------------------------------
class _Line:
    """A TwilioAudioOutput with its frames collected and its playback events recorded."""

    def __init__(self, mark_timeout_s: float = 5.0) -> None:
        self.sent: list[dict] = []
        self.out = tw.TwilioAudioOutput(stream_sid=SID, encode=tw.pcm16_to_ulaw,
                                        send_now=lambda m: self.sent.append(json.loads(m)),
                                        mark_timeout_s=mark_timeout_s)
        self.started: list[float] = []
        self.finished: list[tuple[float, bool]] = []
        self.out.on("playback_started", lambda ev: self.started.append(ev.created_at))
        self.out.on("playback_finished",
                    lambda ev: self.finished.append((ev.playback_position, ev.interrupted)))

    async def say(self, seconds: float, *, flush: bool = True) -> None:
        samples = np.full(int(seconds * 8000), 3000, np.int16)
        for i in range(0, len(samples), 80):  # 10 ms frames, faster than real time like TTS
            chunk = samples[i:i + 80]
            await self.out.capture_frame(rtc.AudioFrame(chunk.tobytes(), 8000, 1, len(chunk)))
        if flush:
            self.out.flush()

    async def send_for(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            self.sent += [json.loads(m) for m in await self.out.next_message_batch()]

    def marks(self) -> list[str]:
        return [m["mark"]["name"] for m in self.sent if m["event"] == "mark"]


async def test_each_chunk_is_followed_by_a_mark_and_sent_just_ahead_of_real_time():
    line = _Line()
    await line.say(0.4)
    await line.send_for(0.2)
    kinds = [m["event"] for m in line.sent]
    assert kinds[:4] == ["media", "mark", "media", "mark"]
    media = [m for m in line.sent if m["event"] == "media"]
    assert all(len(base64.b64decode(m["media"]["payload"])) == 160 for m in media)
    assert all(m["streamSid"] == SID for m in line.sent)
    # 0.2 s of real time + the send lead: not the whole 0.4 s reply at once
    assert 0.2 <= len(media) * 0.02 <= 0.2 + tw.SEND_LEAD_S + 0.06
    assert line.finished == [] and line.started == []  # nothing heard yet


async def test_echoed_marks_start_the_reply_and_finish_it_at_its_full_length():
    line = _Line()
    await line.say(0.3)
    await line.send_for(0.45)
    marks = line.marks()
    line.out.on_mark(marks[0])
    assert len(line.started) == 1 and line.finished == []
    for name in marks[1:]:
        line.out.on_mark(name)
    assert line.finished == [(pytest.approx(0.3), False)]


async def test_clear_buffer_sends_clear_and_reports_only_what_was_heard():
    line = _Line()
    await line.say(2.0)
    await line.send_for(0.3)
    heard = line.marks()[:5]  # the caller heard 5 chunks = 0.1 s
    for name in heard:
        line.out.on_mark(name)
    line.out.clear_buffer()
    assert line.sent[-1] == {"event": "clear", "streamSid": SID}
    assert line.finished == [(pytest.approx(0.1), True)]
    for name in line.marks()[5:]:  # the provider echoes the dropped marks after a clear
        line.out.on_mark(name)
    assert len(line.finished) == 1 and len(line.started) == 1
    await line.say(0.1)  # the next reply plays and is measured from zero
    before = len(line.sent)
    await line.send_for(0.2)
    for name in [m["mark"]["name"] for m in line.sent[before:] if m["event"] == "mark"]:
        line.out.on_mark(name)
    assert line.finished[-1] == (pytest.approx(0.1), False)


async def test_clear_while_the_reply_is_still_being_synthesised_ends_it_at_its_flush():
    line = _Line()
    await line.say(1.0, flush=False)
    await line.send_for(0.1)
    line.out.on_mark(line.marks()[2])
    line.out.clear_buffer()
    await line.say(0.5, flush=False)  # TTS frames still arriving: dropped
    line.out.flush()
    assert line.finished == [(pytest.approx(0.06), True)]


async def test_pause_stops_sending_and_resume_continues():
    line = _Line()
    await line.say(1.0)
    await line.send_for(0.1)
    line.out.pause()
    await asyncio.sleep(0.05)
    sent = len(line.sent)
    await line.send_for(0.2)
    assert len(line.sent) == sent
    line.out.resume()
    await line.send_for(0.1)
    assert len(line.sent) > sent


async def test_unechoed_marks_fall_back_to_the_send_clock():
    line = _Line(mark_timeout_s=0.1)
    await line.say(0.1)
    await line.send_for(0.4)
    assert line.finished == [(pytest.approx(0.1), False)]
    assert line.out.stats.mark_timeouts == 1


async def test_a_mark_we_never_sent_is_a_protocol_error():
    line = _Line()
    with pytest.raises(tw.ProtocolError):
        line.out.on_mark("greeting-done")
