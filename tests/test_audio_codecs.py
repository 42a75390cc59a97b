from __future__ import annotations

import numpy as np
import pytest

from audio.codecs import (
    StreamResampler,
    float_to_int16,
    frames,
    int16_to_float,
    mulaw_decode,
    mulaw_encode,
    read_wav,
    resample,
    write_wav,
)


def _sine(freq: float, rate: int, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spectrum)])


@pytest.mark.parametrize(("src", "dst"), [(8000, 16000), (48000, 16000), (22050, 24000),
                                          (16000, 8000), (24000, 48000)])
def test_resample_keeps_duration_and_pitch(src, dst):
    out = resample(_sine(440.0, src), src, dst)
    assert abs(len(out) - dst) <= 2
    assert abs(_peak_hz(out, dst) - 440.0) < 3.0


def test_resample_keeps_int16():
    out = resample(float_to_int16(_sine(300.0, 48000)), 48000, 8000)
    assert out.dtype == np.int16 and abs(len(out) - 8000) <= 2


def test_resample_rejects_bad_rates():
    with pytest.raises(ValueError):
        resample(np.zeros(10, np.float32), 0, 16000)


def test_stream_resampler_matches_duration():
    r = StreamResampler(48000, 16000)
    x = float_to_int16(_sine(500.0, 48000))
    out = np.concatenate([r.push(f) for f in frames(x, 48000, 20)] + [r.push(x[:0], last=True)])
    assert abs(len(out) - 16000) < 50
    assert abs(_peak_hz(int16_to_float(out), 16000) - 500.0) < 3.0


def test_mulaw_round_trip_error_is_within_a_quantisation_step():
    x = np.arange(-32768, 32768, 7, dtype=np.int16)
    y = mulaw_decode(mulaw_encode(x)).astype(np.int32)
    err = np.abs(y - x.astype(np.int32))
    # mu-law steps grow with magnitude: error <= ~1/16 of the value plus the smallest step
    assert np.all(err <= np.abs(x.astype(np.int32)) / 16 + 8)
    assert len(mulaw_encode(x)) == len(x)


def test_mulaw_known_codes():
    assert mulaw_encode(np.array([0], np.int16)) == b"\xff"
    assert mulaw_encode(np.array([-32768], np.int16)) == b"\x00"
    assert mulaw_encode(np.array([32767], np.int16)) == b"\x80"
    codes = bytes(range(256))
    again = mulaw_encode(mulaw_decode(codes))
    assert [a for a, b in zip(again, codes, strict=True) if a != b] in ([], [0xFF])


def test_int16_float_round_trip():
    x = np.array([-32768, -1, 0, 1, 32767], np.int16)
    f = int16_to_float(x)
    assert f.dtype == np.float32 and f.min() >= -1.0 and f.max() < 1.0
    assert np.all(np.abs(float_to_int16(f).astype(int) - x.astype(int)) <= 1)
    assert float_to_int16(np.array([2.0, -2.0])).tolist() == [32767, -32767]


def test_wav_round_trip(tmp_path):
    x = float_to_int16(_sine(200.0, 22050, 0.3))
    write_wav(tmp_path / "a.wav", x, 22050)
    y, rate = read_wav(tmp_path / "a.wav")
    assert rate == 22050 and np.array_equal(x, y)
    write_wav(tmp_path / "f.wav", _sine(200.0, 8000, 0.1), 8000)
    assert read_wav(tmp_path / "f.wav")[0].dtype == np.int16


def test_read_wav_names_a_file_that_is_not_one(tmp_path):
    (tmp_path / "text.wav").write_text("hello")
    (tmp_path / "empty.wav").write_bytes(b"")
    for name in ("text.wav", "empty.wav"):
        with pytest.raises(ValueError, match=f"{name}: not a PCM WAV file"):
            read_wav(tmp_path / name)
    x = float_to_int16(_sine(200.0, 8000, 0.1))
    write_wav(tmp_path / "cut.wav", x, 8000)
    data = (tmp_path / "cut.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[:-101])  # cut mid-sample, header left as it was
    y, rate = read_wav(tmp_path / "cut.wav")
    assert rate == 8000 and np.array_equal(y, x[: len(y)]) and len(y) == len(x) - 51


def test_frames_cover_audio_and_pad_the_tail():
    x = np.arange(1000, dtype=np.int16)
    out = list(frames(x, 16000, 20))
    assert [len(f) for f in out] == [320] * 4
    assert np.array_equal(np.concatenate(out)[:1000], x) and not out[-1][40:].any()
    with pytest.raises(ValueError):
        list(frames(x, 10, 20))
