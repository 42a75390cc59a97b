"""Statistics, terminal tables, JSON, PNG and HTML for `diffvoice bench` results.

A run is a dict `{"config", "transport", "levels": [...], "turns": [turn, ...]}`; each turn is a
dict whose keys are documented in docs/benchmarks.md (`latency_s`, `breakdown_s`, `cold`, ...).
Everything here is pure: turns in, numbers/text/files out.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import numpy as np

# the per-stage breakdown, in the order a turn passes through them
STAGES = ("endpoint_s", "transcript_s", "llm_s", "tts_s", "transport_playout_s")
STAGE_LABELS = {
    "endpoint_s": "endpoint wait", "transcript_s": "final transcript",
    "llm_s": "first LLM span", "tts_s": "TTS first audio",
    "transport_playout_s": "transport/playout",
}
# hops inside transport/playout, measured when the server shares the caller's clock
HOPS = ("speech_end_lag_s", "playout_s")
HOP_LABELS = {"speech_end_lag_s": "to the VAD's end of speech", "playout_s": "after playback start"}
# said over a reply (`bench.barge_in_ms`): what became of the reply, and the hops of its stop
BARGE_STATUSES = ("stopped", "paused", "talked_over", "ended")
BARGE_HOPS = ("onset_s", "decide_s", "playout_s")
BARGE_HOP_LABELS = {"onset_s": "to the VAD's report of speech", "decide_s": "interruption rule",
                    "playout_s": "output stop to last sound heard"}
PERCENTILES = (50, 95, 99)
# every turn record of bench.json has exactly these keys (documented in docs/benchmarks.md);
# failed turns add "error"
TURN_KEYS = frozenset({
    "config", "sessions", "session", "conversation", "turn", "cold", "status", "prompt_text",
    "recognised_text", "reply_text", "latency_s", "breakdown_s", "hops_s", "server_s",
    "barge_in", "t_speech_end_s", "t_first_audible_s",
})


def latency_stats(values: list[float]) -> dict[str, float | int | None]:
    """n, p50/p95/p99 (linear interpolation), mean and max, in seconds."""
    if not values:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    a = np.asarray(values, dtype=np.float64)
    out: dict[str, float | int | None] = {"n": len(values)}
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(a, p))
    out["mean"], out["max"] = float(a.mean()), float(a.max())
    return out


def measured(turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [t for t in turns if t["status"] == "ok"]


def summarize(turns: list[dict[str, Any]]) -> dict[str, Any]:
    """Latency stats for all/cold/warm turns, mean stage and hop times, dropped/failed counts."""
    ok = measured(turns)
    return {
        "all": latency_stats([t["latency_s"] for t in ok]),
        "cold": latency_stats([t["latency_s"] for t in ok if t["cold"]]),
        "warm": latency_stats([t["latency_s"] for t in ok if not t["cold"]]),
        "stage_mean_s": _means(ok, "breakdown_s", STAGES),
        "hop_mean_s": _means(ok, "hops_s", HOPS),
        "dropped_turns": sum(t["status"] == "dropped" for t in turns),
        "failed_turns": sum(t["status"] == "failed" for t in turns),
        "cut_in_turns": sum(t["status"] == "cut_in" for t in turns),
        "gap_turns": sum((t.get("server_s") or {}).get("reply_gaps_s", 0) > 0 for t in turns),
        "reply_words": reply_words(ok),
        "barge_in": barge_in_summary(turns),
    }


def barge_in_summary(turns: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Over the turns spoken over: how many replies ended each way, the stop as the caller
    heard it (stopped replies) and its mean hops, how long paused replies were silent; None
    when none was spoken over."""
    over = [t["barge_in"] for t in turns if t.get("barge_in")]
    if not over:
        return None
    halted = [b for b in over if b["stop_s"] is not None]
    return {"turns": len(over),
            "statuses": {s: sum(b["status"] == s for b in over) for s in BARGE_STATUSES},
            "stop": latency_stats([b["stop_s"] for b in halted]),
            "pause": latency_stats([b["pause_s"] for b in over if b["pause_s"] is not None]),
            "hop_mean_s": _means(halted, "hops_s", BARGE_HOPS)}


def reply_words(turns: list[dict[str, Any]]) -> dict[str, float | int | None]:
    """How much the agent said: a latency is only comparable between replies of a voice's
    length (a model that loops to its token limit can still answer as fast)."""
    words = [len(t["reply_text"].split()) for t in turns if t.get("reply_text")]
    return {"median": float(np.median(words)) if words else None,
            "max": max(words, default=None)}


def _means(turns: list[dict[str, Any]], key: str, names: tuple[str, ...]) -> dict[str, float]:
    """Mean of each of `names` in the turns' `key` dicts ({} when no turn has one)."""
    have = [t[key] for t in turns if t.get(key)]
    return {n: float(np.mean([d[n] for d in have])) for n in names} if have else {}


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def stats_row(name: str, st: dict[str, Any]) -> str:
    return (f"  {name:<10} n={st['n']:<4} p50={_ms(st['p50']):>6} p95={_ms(st['p95']):>6} "
            f"p99={_ms(st['p99']):>6} max={_ms(st['max']):>6} ms")


def run_text(run: dict[str, Any]) -> str:
    """The terminal report of one config: latency rows, stage table, concurrency levels."""
    s = run["summary"]
    lines = [f"== {run['config']} ({run['transport']}): client latency, last speech sample "
             "-> first audible agent sample"]
    lines += [stats_row(k, s[k]) for k in ("warm", "cold", "all")]
    if s["stage_mean_s"]:
        total = sum(s["stage_mean_s"].values()) or 1.0
        lines.append("  breakdown (mean over measured turns):")
        for stage, v in s["stage_mean_s"].items():
            share = 100 * v / total
            lines.append(f"    {STAGE_LABELS[stage]:<18} {v * 1000:7.0f} ms  {share:5.1f}%")
        for hop, v in s["hop_mean_s"].items():
            lines.append(f"      of which {HOP_LABELS[hop]:<27} {v * 1000:5.0f} ms")
    said = s["reply_words"]
    if said["max"] is not None:
        lines.append(f"  replies: median {said['median']:g} words, longest {said['max']}")
    if s["barge_in"]:
        lines += barge_in_text(s["barge_in"])
    for level in run["levels"]:
        w = level["summary"]["warm"]
        lines.append(f"  sessions={level['sessions']}: warm p50={_ms(w['p50'])} "
                     f"p95={_ms(w['p95'])} ms, dropped={level['summary']['dropped_turns']}, "
                     f"failed={level['summary']['failed_turns']}, "
                     f"cut in={level['summary']['cut_in_turns']}, "
                     f"gaps={level['summary']['gap_turns']}")
    return "\n".join(lines)


def barge_in_text(b: dict[str, Any]) -> list[str]:
    n, st = b["statuses"], b["stop"]
    paused = f" (silent p50 {_ms(b['pause']['p50'])} ms)" if b["pause"]["n"] else ""
    lines = [f"  spoken over {b['turns']} replies: stopped {n['stopped']}, paused and resumed "
             f"{n['paused']}{paused}, talked over {n['talked_over']}, ended first {n['ended']}",
             f"    stop heard: n={st['n']} p50={_ms(st['p50'])} p95={_ms(st['p95'])} "
             f"max={_ms(st['max'])} ms (caller's first loud sample -> agent's last)"]
    lines += [f"      of which {BARGE_HOP_LABELS[h]:<31} {v * 1000:5.0f} ms"
              for h, v in b["hop_mean_s"].items()]
    return lines


def comparison(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Warm p50/p95 of each run and its ratio against the first run's (x = times slower)."""
    base = runs[0]["summary"]["warm"]
    rows = []
    for run in runs:
        w = run["summary"]["warm"]
        row: dict[str, Any] = {"config": run["config"], "warm_p50_s": w["p50"],
                               "warm_p95_s": w["p95"]}
        over = run["summary"]["barge_in"]
        row["stop_p50_s"] = over["stop"]["p50"] if over else None
        for p in ("p50", "p95"):
            ok = w[p] is not None and base[p]
            row[f"{p}_vs_first"] = w[p] / base[p] if ok else None
        rows.append(row)
    return rows


def comparison_text(rows: list[dict[str, Any]]) -> str:
    lines = [f"== compare (ratio vs {rows[0]['config']}; >1 = slower)"]
    for r in rows:
        ratio = "-" if r["p50_vs_first"] is None else f"{r['p50_vs_first']:.2f}x"
        ratio95 = "-" if r["p95_vs_first"] is None else f"{r['p95_vs_first']:.2f}x"
        stop = "" if r["stop_p50_s"] is None else f"  stop p50={_ms(r['stop_p50_s'])} ms"
        lines.append(f"  {r['config']:<28} warm p50={_ms(r['warm_p50_s']):>6} ms ({ratio})  "
                     f"p95={_ms(r['warm_p95_s']):>6} ms ({ratio95}){stop}")
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=1))


def plot_png(runs: list[dict[str, Any]], path: Path) -> None:
    """Stacked per-stage bars for every measured turn (runs side by side), latency CDFs and,
    for runs with several concurrency levels, warm latency against the number of callers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = any(len(run["levels"]) > 1 for run in runs)
    fig, axes = plt.subplots(1, 2 + levels, figsize=(13 + 4.5 * levels, 4.5),
                             width_ratios=(2, 1, 1)[:2 + levels])
    bars, cdf = axes[:2]
    _stacked_bars(bars, runs)
    if levels:
        _latency_by_callers(axes[2], runs)
    for run in runs:
        lat = np.sort([t["latency_s"] * 1000 for t in measured(run["turns"])])
        if len(lat):
            cdf.step(lat, np.arange(1, len(lat) + 1) / len(lat), where="post", label=run["config"])
    cdf.set_xlabel("client latency (ms)")
    cdf.set_ylabel("fraction of turns")
    cdf.set_title("latency CDF")
    cdf.grid(alpha=0.3)
    _legend(cdf)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _legend(ax: Any, ncol: int = 1) -> None:
    """A legend where something was drawn (a run whose every turn failed draws nothing)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=ncol)


def _latency_by_callers(ax: Any, runs: list[dict[str, Any]]) -> None:
    """Warm p50 (solid) and p95 (dashed) per concurrency level, one colour per run; levels
    that lost a turn (dropped or failed) are ringed."""
    for i, run in enumerate(runs):
        colour = f"C{i}"
        n = [lv["sessions"] for lv in run["levels"]]
        for q, style in (("p50", "-o"), ("p95", "--o")):
            ms = [np.nan if (v := lv["summary"]["warm"][q]) is None else v * 1000
                  for lv in run["levels"]]
            ax.plot(n, ms, style, color=colour, label=f"{run['config']} {q}")
        lost = [(lv["sessions"], lv["summary"]["warm"]["p95"]) for lv in run["levels"]
                if lv["summary"]["dropped_turns"] + lv["summary"]["failed_turns"]]
        for x, p95 in lost:
            ax.plot(x, (p95 or 0) * 1000, "o", ms=14, mfc="none", color="red")
    ax.set_xlabel("simultaneous callers")
    ax.set_ylabel("warm client latency (ms)")
    ax.set_title("latency vs callers")
    ax.set_xticks(sorted({lv["sessions"] for run in runs for lv in run["levels"]}))
    ax.grid(alpha=0.3)
    _legend(ax)


def _stacked_bars(ax: Any, runs: list[dict[str, Any]]) -> None:
    turns = [(run["config"], t) for run in runs for t in measured(run["turns"]) if t["breakdown_s"]]
    x = np.arange(len(turns))
    bottom_pos, bottom_neg = np.zeros(len(turns)), np.zeros(len(turns))
    for stage in STAGES:
        v = np.array([t["breakdown_s"][stage] * 1000 for _, t in turns])
        base = np.where(v >= 0, bottom_pos, bottom_neg)
        ax.bar(x, v, bottom=base, label=STAGE_LABELS[stage], width=0.85)
        bottom_pos += np.where(v >= 0, v, 0)
        bottom_neg += np.where(v < 0, v, 0)
    ax.plot(x, [t["latency_s"] * 1000 for _, t in turns], "k.", label="client latency")
    for i in range(1, len(turns)):
        if turns[i][0] != turns[i - 1][0]:
            ax.axvline(i - 0.5, color="grey", lw=0.8)
    ax.set_xlabel("turn (runs in order: " + ", ".join(r["config"] for r in runs) + ")")
    ax.set_ylabel("ms")
    ax.set_title("per-turn breakdown")
    _legend(ax, ncol=3)


def html_report(report: dict[str, Any], png_path: Path) -> str:
    """One self-contained page: the terminal text, the plot (base64 PNG) and every turn."""
    png = base64.b64encode(png_path.read_bytes()).decode()
    rows = "".join(_turn_row(t) for run in report["runs"] for t in run["turns"])
    head = "".join(f"<th>{h}</th>" for h in (
        "config", "sessions", "session", "conv", "turn", "cold", "status", "latency ms",
        *(STAGE_LABELS[s] for s in STAGES), "said", "recognised", "reply", "spoken over",
        "stop ms"))
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>diffvoice bench</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{border:1px solid #ccc;"
        "padding:2px 6px;font-size:12px}table{border-collapse:collapse}</style></head><body>"
        f"<h1>diffvoice bench</h1><p>{html.escape(report['machine']['cpu'])}, "
        f"load before {report['machine']['load_before']}</p>"
        f"<pre>{html.escape(report['text'])}</pre>"
        f"<img alt='latency plot' src='data:image/png;base64,{png}'>"
        f"<h2>Turns</h2><table><tr>{head}</tr>{rows}</table></body></html>"
    )


def _turn_row(t: dict[str, Any]) -> str:
    b = t["breakdown_s"] or {}
    cells = [t["config"], t["sessions"], t["session"], t["conversation"], t["turn"], t["cold"],
             t["status"], _ms(t["latency_s"]), *(_ms(b.get(s)) for s in STAGES),
             t["prompt_text"], t["recognised_text"], t["reply_text"]]
    over = t.get("barge_in") or {}
    cells += [over.get("status", ""), _ms(over.get("stop_s"))]
    return "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"

