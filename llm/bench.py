"""`diffvoice bench-llm`: engine speed against an autoregressive baseline measured in the same run.

Prints (and writes with `--json`, keys in docs/benchmarks.md): ms per denoising step, tokens
per forward, time to first committed span, whole-reply time, tokens/s, peak memory; the same for
an AR model of the same shape (causal attention, K/V cache, one token per forward) and the
speed ratio; the weight-read lower bound of one step (parameter bytes / memory bandwidth) and
the fraction of it achieved; N concurrent requests batched; token agreement of the engine's
cached decoding with the uncached reference sampler.

Random-weight shapes never reach a confident threshold and never end their turn, so speed on
them is measured with a fixed tokens-per-step schedule and a reply of exactly the asked length.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llm.engine import DiffusionEngine, engine_dtype, for_engine
from llm.model import Transformer, weight_bytes
from llm.sampler import generate_llada, generate_threshold, trim_reply
from llm.settings import DecodeSettings, LLMSettings, UsageError, engine_threads
from llm.shapes import SHAPES, random_model, random_word, word_tokenizer
from llm.tokenizer import ChatTokenizer

# the options that count something: none may be below 1
COUNTS = ("prompt_tokens", "reply_tokens", "block_length", "tokens_per_step", "sessions",
          "repeats")
# named runs; command-line flags override single fields
PRESETS: dict[str, dict[str, Any]] = {
    # the shipped models on a laptop CPU as deployed: a voice reply after a short conversation,
    # decoded with the config's threshold in blocks of 8 (the fixed schedule of 8 tokens per
    # step with --tokens-per-step 8 --block-length 16, and on random weights)
    "cpu-default": dict(model="dv-small", ar_model="dv-small-ar", shape="dv-small",
                        device="cpu", prompt_tokens=64, reply_tokens=32, block_length=8,
                        tokens_per_step=8, decoding="threshold", sessions=4, repeats=5,
                        bandwidth_gbs=20.0),
    # LLaDA-8B-sized random weights on one GPU (prompt 512, reply 64, block 32, 8 tokens/step)
    "gpu-llada-8b": dict(model=None, ar_model=None, shape="llada-8b", device="cuda",
                         prompt_tokens=512, reply_tokens=64, block_length=32, tokens_per_step=8,
                         decoding="fixed", sessions=16, repeats=5, bandwidth_gbs=None),
}
GPU_BANDWIDTH_GBS = {"H100": 3350.0, "H200": 4800.0}  # HBM3 / HBM3e peak, SXM
AGREEMENT_PROMPTS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-default",
                        help="a named run; the flags below override its fields")
    parser.add_argument("--model", help="shipped model name or checkpoint folder")
    parser.add_argument("--ar-model", help="the autoregressive baseline checkpoint")
    parser.add_argument("--shape", choices=sorted(SHAPES),
                        help="random weights of this shape (with --random, or for a preset "
                             "that names no model)")
    parser.add_argument("--random", action="store_true", help="random weights even if shipped")
    parser.add_argument("--device", help="cpu or cuda")
    parser.add_argument("--prompt-tokens", type=int)
    parser.add_argument("--reply-tokens", type=int)
    parser.add_argument("--block-length", type=int)
    parser.add_argument("--tokens-per-step", type=int,
                        help="a fixed schedule instead of the preset's threshold decoding; "
                             "random weights always use one")
    parser.add_argument("--threshold", action="store_true",
                        help="threshold decoding from the settings (trained models only; "
                             "the cpu-default preset's own)")
    parser.add_argument("--sessions", type=int, help="concurrent requests in one batch")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--bandwidth-gbs", type=float, help="memory bandwidth for the bound")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--profile", type=Path,
                        help="write a per-step log and torch.profiler tables of a solo next "
                             "turn and of the sessions' next turn here")
    parser.add_argument("--draft-reuse", action="store_true",
                        help="only measure re-denoising from a preemptive draft vs starting over "
                             "(the configured model and decode settings, --repeats rounds)")


def run(args: argparse.Namespace, settings) -> int:
    opts = {**PRESETS[args.preset]}
    for key in opts:
        value = getattr(args, key, None)
        if value is not None:
            opts[key] = value
    opts["profile"] = args.profile
    missing = [f"--{flag.replace('_', '-')} {name}" for flag in ("model", "ar_model")
               if (name := getattr(args, flag)) and not args.random and not has_checkpoint(name)]
    if missing:  # a name given on purpose: never times random weights in its place
        raise UsageError(f"no checkpoint for {', '.join(missing)} (--random times random "
                         "weights of --shape)")
    small = [k for k in COUNTS if opts.get(k) is not None and opts[k] < 1]
    if small:
        names = ", ".join(f"--{k.replace('_', '-')}" for k in small)
        raise UsageError(f"{names} must be at least 1")
    llm = settings.llm.model_copy(update={"device": opts["device"]})
    if llm.device != "cpu":  # a GPU preset over the CPU deployment's config: no CPU int8
        llm = llm.model_copy(update={"quantize": "none"})
    torch.set_num_threads(engine_threads(llm))
    if args.draft_reuse:
        result = draft_reuse_benchmark(settings.llm, args.repeats or 1)
        print_draft_report(result)
    else:
        threshold = args.threshold or (opts["decoding"] == "threshold"
                                       and args.tokens_per_step is None)
        result = benchmark(opts, llm, force_random=args.random, threshold=threshold)
        print_report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


# --- models ------------------------------------------------------------------------------------


@dataclass
class BenchModel:
    model: Transformer
    tokenizer: ChatTokenizer
    name: str
    random: bool


def has_checkpoint(name: str) -> bool:
    from llm.checkpoints import resolve_model_path

    return (resolve_model_path(name) / "config.json").is_file()


def load_or_random(name: str | None, opts: dict, llm: LLMSettings, causal: bool,
                   force_random: bool) -> BenchModel:
    from llm.checkpoints import load_checkpoint, resolve_model_path

    device, dtype = torch.device(opts["device"]), engine_dtype(llm)
    if name and not force_random and has_checkpoint(name):
        loaded = load_checkpoint(resolve_model_path(name), device=device, dtype=dtype)
        return BenchModel(for_engine(loaded.model.eval(), llm), loaded.tokenizer, name, False)
    tok = word_tokenizer(SHAPES[opts["shape"]]["vocab_size"])
    model = random_model(opts["shape"], device, dtype, causal, tok)
    return BenchModel(for_engine(model, llm), tok, f"random {opts['shape']}", True)


# --- measurements ------------------------------------------------------------------------------


def decode_settings(opts: dict, llm: LLMSettings, use_threshold: bool) -> DecodeSettings:
    block = opts["block_length"]
    common = dict(max_new_tokens=opts["reply_tokens"], block_length=block,
                  lookahead_blocks=llm.decode.lookahead_blocks)
    if use_threshold:
        return llm.decode.model_copy(update={**common, "strategy": "threshold"})
    steps = max(1, block // opts["tokens_per_step"])
    return llm.decode.model_copy(update={**common, "strategy": "fixed", "steps_per_block": steps})


# a voice conversation for trained models: earlier turns are added until the prompt is long enough
CONVERSATION = [
    ("Hi there!", "Hello! How are you doing today?"),
    ("Pretty good, thanks. I just got back from a walk.", "That sounds lovely. Where did you go?"),
    ("Down by the river. The weather was great.", "Nice! Do you walk there often?"),
    ("Most weekends, yes. It helps me relax.", "That is a good habit. What else do you enjoy?"),
    ("I like cooking, and I read a lot.", "What are you reading at the moment?"),
    ("A mystery novel a friend gave me.", "Fun! Is it any good so far?"),
] * 8
FOLLOW_UP = "Thanks! And what else would you suggest?"
QUESTIONS = ["What should I cook for dinner tonight?", "Can you recommend a good movie?",
             "What do you like to do on weekends?", "How can I sleep better?"]


def follow_up_ids(tok: ChatTokenizer) -> list[int]:
    """The next user turn appended to a conversation (without BOS)."""
    return tok.encode_chat([{"role": "user", "content": FOLLOW_UP}])[1:]


def prompt_ids(tok: ChatTokenizer, n: int, salt: int = 0) -> list[int]:
    """A chat prompt of about n tokens (exactly n for the random shapes' word vocabulary)."""
    if tok.tok.token_to_id(random_word(101)) == 101:  # `word_tokenizer`: word i has id i
        head = tok.encode_chat([{"role": "user", "content": ""}])
        body = [100 + (salt + i) % 1000 for i in range(n)]
        return head[:-2] + body[: max(0, n - len(head))] + head[-2:]
    question = {"role": "user", "content": QUESTIONS[salt % len(QUESTIONS)]}
    for turns in range(len(CONVERSATION) + 1):
        history = [m for u, a in CONVERSATION[:turns]
                   for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
        ids = tok.encode_chat([*history, question])
        if len(ids) >= n:
            break
    return ids


def solo_runs(engine: DiffusionEngine, ids: list[int], decode: DecodeSettings,
              repeats: int) -> dict[str, float]:
    list(engine.stream_ids(ids, decode=decode))  # warm-up (allocations, compilation)
    engine.step_log.clear()
    stats = []
    for _ in range(repeats):
        stream = engine.stream_ids(ids, decode=decode)
        list(stream)
        stats.append(stream.stats)
    total = statistics.median(s.total_s for s in stats)
    nfe = statistics.median(s.nfe for s in stats)
    tokens = statistics.median(s.reply_tokens for s in stats)
    ttfs = [s.ttfs_s for s in stats if s.ttfs_s is not None]
    log = list(engine.step_log)
    steps = [r for r in log if not r.refresh]
    refreshes = [r for r in log if r.refresh and not r.encode]  # the prompt encode apart
    encodes = [r for r in log if r.encode]
    return dict(reply_ms=1e3 * total, nfe=nfe, reply_tokens=tokens,
                prompt_tokens=stats[0].prompt_tokens,
                ms_per_step=1e3 * total / max(nfe, 1), tokens_per_forward=tokens / max(nfe, 1),
                tokens_per_s=tokens / total,
                ttfs_ms=1e3 * statistics.median(ttfs) if ttfs else None,
                window_step_ms=_median_ms(r.seconds for r in steps),
                refresh_ms=_median_ms(r.seconds for r in refreshes),
                encode_ms=_median_ms(r.seconds for r in encodes),
                window_forward_gpu_ms=_median_ms(r.forward_gpu_s for r in steps),
                refresh_forward_gpu_ms=_median_ms(r.forward_gpu_s for r in refreshes),
                encode_forward_gpu_ms=_median_ms(r.forward_gpu_s for r in encodes))


def _median_ms(seconds: Iterable[float | None]) -> float | None:
    known = [s for s in seconds if s is not None]
    return 1e3 * statistics.median(known) if known else None


def next_turn_runs(engine: DiffusionEngine, tok: ChatTokenizer, ids: list[int],
                   decode: DecodeSettings, repeats: int) -> dict[str, Any]:
    """A session's next turn: the conversation's K/V are kept, only the follow-up is encoded.
    Each repeat is a new session whose first turn is not timed."""
    follow = follow_up_ids(tok)
    stats = []
    for i in range(repeats + 1):  # the first round warms the shapes up
        sid = f"next-turn-{i}"
        list(engine.stream_ids(ids, session_id=sid, decode=decode))
        stream = engine.stream_ids(ids + follow, session_id=sid, decode=decode)
        list(stream)
        stats.append(stream.stats)
    stats = stats[1:]
    ttfs = [s.ttfs_s for s in stats if s.ttfs_s is not None]
    return dict(reply_ms=1e3 * statistics.median(s.total_s for s in stats),
                ttfs_ms=1e3 * statistics.median(ttfs) if ttfs else None,
                reply_tokens=statistics.median(s.reply_tokens for s in stats),
                cached_prompt_tokens=min(s.cached_prompt_tokens for s in stats),
                new_prompt_tokens=len(follow))


def concurrent_runs(engine: DiffusionEngine, tok: ChatTokenizer, opts: dict,
                    decode: DecodeSettings) -> dict[str, Any]:
    """N sessions at once: a cold turn (whole prompts encoded), then each session's next turn,
    whose prompt extends the first by a follow-up question (only the new tokens are encoded)."""
    n = opts["sessions"]
    first = [prompt_ids(tok, opts["prompt_tokens"], salt=i) for i in range(n)]
    follow = follow_up_ids(tok)
    nxt = [p + follow for p in first]
    # each timed round's shapes are run once before (compiled steps, captured graphs)
    rounds = [("warm-up", first), ("warm-up", nxt), ("cold", first), ("cached", nxt)]
    done: dict[str, list[float]] = {}
    for name, prompts in rounds:
        sid = "w" if name == "warm-up" else "s"  # a session's second round is its next turn
        streams = [engine.stream_ids(p, session_id=f"{sid}{i}", decode=decode)
                   for i, p in enumerate(prompts)]
        for st in streams:
            list(st)
        done[name] = sorted(1e3 * st.stats.total_s for st in streams)
        cached = [st.stats.cached_prompt_tokens for st in streams]
    return dict(n=n, cold_finished_ms=done["cold"], cold_max_ms=done["cold"][-1],
                finished_ms=done["cached"], max_ms=done["cached"][-1],
                mean_ms=statistics.mean(done["cached"]), new_prompt_tokens=len(follow),
                cached_prompt_tokens=min(cached))


def profile_turns(engine: DiffusionEngine, tok: ChatTokenizer, opts: dict,
                  decode: DecodeSettings) -> str:
    """Where a next turn's time goes: every step's time and its forward's GPU time, then (CUDA)
    torch.profiler's kernels by GPU time and host calls by CPU time, for one session's next
    turn and for `sessions` sessions' next turns together."""
    from torch.profiler import ProfilerActivity, profile

    follow = follow_up_ids(tok)
    n, device = opts["sessions"], engine.device
    firsts = [prompt_ids(tok, opts["prompt_tokens"], salt=i) for i in range(n)]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = []
    for name, prompts in (("1 session", firsts[:1]), (f"{n} sessions", firsts)):
        for turn in (prompts, [p + follow for p in prompts]):  # first turns untimed
            engine.step_log.clear()
            with profile(activities=acts) as prof:
                streams = [engine.stream_ids(p, session_id=f"profile-{name}-{i}", decode=decode)
                           for i, p in enumerate(turn)]
                for st in streams:
                    list(st)
        out.append(f"== {name}, next turn: {max(1e3 * st.stats.total_s for st in streams):.1f} "
                   "ms\nkind     rows  step ms  forward on the GPU ms")
        for r in engine.step_log:
            kind = "encode" if r.encode else "refresh" if r.refresh else "step"
            gpu = "-" if r.forward_gpu_s is None else f"{1e3 * r.forward_gpu_s:.2f}"
            out.append(f"{kind:8s} {r.rows:4d} {1e3 * r.seconds:8.2f} {gpu:>8s}")
        if device.type != "cuda":  # the operators run on the engine's worker thread, which
            continue  # the profiler does not follow; CUDA kernels and runtime calls it does
        table = prof.key_averages()
        out += ["-- kernels by GPU time",
                table.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70),
                "-- host calls by CPU time",
                table.table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=70)]
    return "\n".join(out) + "\n"


def agreement(bm: BenchModel, engine: DiffusionEngine, opts: dict,
              decode: DecodeSettings) -> dict[str, Any]:
    """Share of reply positions where the engine's tokens equal the uncached reference's. The
    engine's canvas is set to the reference's fixed one (lookahead over the whole reply), so
    the number measures the caches, not the adaptive canvas, which changes what the model sees."""
    tok, scores = bm.tokenizer, []
    block = decode.block_length
    gen_length = -(-decode.max_new_tokens // block) * block
    decode = decode.model_copy(update={"lookahead_blocks": gen_length // block - 1})
    for i in range(AGREEMENT_PROMPTS):
        ids = prompt_ids(tok, opts["prompt_tokens"], salt=100 + i)
        stream = engine.stream_ids(ids, decode=decode)
        got = [t for s in stream for t in s.token_ids]
        ref = reference_reply(bm, ids, decode, gen_length)[: decode.max_new_tokens]
        n = max(len(got), len(ref), 1)
        scores.append(sum(a == b for a, b in zip(got, ref, strict=False)) / n)
    name = "generate_threshold" if decode.strategy == "threshold" else "generate_llada"
    return dict(reference=name, prompts=AGREEMENT_PROMPTS, token_agreement=statistics.mean(scores))


def reference_reply(bm: BenchModel, ids: list[int], decode: DecodeSettings,
                    gen_length: int) -> list[int]:
    tok, block = bm.tokenizer, decode.block_length
    prompt = torch.tensor([ids], device=next(bm.model.parameters()).device)
    kw = dict(mask_id=tok.mask_id, gen_length=gen_length, block_length=block,
              stop_ids=tok.stop_ids, ordered_end=decode.ordered_end,
              no_repeat_ngram=decode.no_repeat_ngram, words=tok.words)
    if decode.strategy == "threshold":
        out, _ = generate_threshold(bm.model, prompt, threshold=decode.threshold, **kw)
    else:
        steps = decode.steps_per_block * (gen_length // block)
        out = generate_llada(bm.model, prompt, steps=steps, **kw)
    return trim_reply(out[0, len(ids):], tok.stop_ids)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def bandwidth_gbs(opts: dict, device: torch.device) -> float | None:
    if opts["bandwidth_gbs"] is not None or device.type != "cuda":
        return opts["bandwidth_gbs"]
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in GPU_BANDWIDTH_GBS.items() if key in name), None)


def benchmark(opts: dict, llm: LLMSettings, *, force_random: bool = False,
              threshold: bool = False) -> dict[str, Any]:
    """Diffusion engine, then the AR baseline of the same shape, on the same prompt."""
    device = torch.device(opts["device"])
    dm = load_or_random(opts["model"], opts, llm, causal=False, force_random=force_random)
    decode = decode_settings(opts, llm, threshold and not dm.random)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    engine = DiffusionEngine(dm.model, dm.tokenizer, llm)
    try:
        ids = prompt_ids(dm.tokenizer, opts["prompt_tokens"])
        diffusion = solo_runs(engine, ids, decode, opts["repeats"])
        diffusion["next_turn"] = next_turn_runs(engine, dm.tokenizer, ids, decode, opts["repeats"])
        diffusion["peak_mem_mb"] = peak_memory_mb(device)
        sessions = concurrent_runs(engine, dm.tokenizer, opts, decode)
        agree = agreement(dm, engine, opts, decode)
        if opts.get("profile"):
            opts["profile"].parent.mkdir(parents=True, exist_ok=True)
            opts["profile"].write_text(profile_turns(engine, dm.tokenizer, opts, decode))
    finally:
        engine.close()
    param_bytes = weight_bytes(dm.model)  # int8 projections (`llm.quantize`) included
    model_info = dict(name=dm.name, random_weights=dm.random, shape=opts["shape"],
                      params=dm.model.num_params(),
                      param_bytes=param_bytes, dtype=str(next(dm.model.parameters()).dtype),
                      device=str(device))
    del dm, engine
    ar = ar_baseline(opts, llm, force_random)
    return dict(
        machine=machine_info(device), model=model_info,
        settings=dict(prompt_tokens=opts["prompt_tokens"], reply_tokens=opts["reply_tokens"],
                      block_length=decode.block_length, strategy=decode.strategy,
                      tokens_per_step=None if decode.strategy == "threshold"
                      else decode.block_length // decode.steps_per_block,
                      threshold=decode.threshold if decode.strategy == "threshold" else None,
                      **llm.engine.model_dump()),
        diffusion=diffusion, ar=ar,
        ratio=dict(speed=diffusion["tokens_per_s"] / ar["tokens_per_s"],
                   reply_time=ar["reply_ms"] / diffusion["reply_ms"]),
        weight_read=weight_read(param_bytes, bandwidth_gbs(opts, device),
                                diffusion["window_step_ms"] or diffusion["ms_per_step"]),
        sessions=sessions, agreement=agree,
    )


def ar_baseline(opts: dict, llm: LLMSettings, force_random: bool) -> dict[str, Any]:
    """Causal model of the same shape: K/V cache, one token per forward, greedy."""
    am = load_or_random(opts["ar_model"], opts, llm, causal=True, force_random=force_random)
    decode = llm.decode.model_copy(update=dict(max_new_tokens=opts["reply_tokens"]))
    engine = DiffusionEngine(am.model, am.tokenizer, llm)
    try:
        ids = prompt_ids(am.tokenizer, opts["prompt_tokens"])
        ar = solo_runs(engine, ids, decode, opts["repeats"])
        ar["next_turn"] = next_turn_runs(engine, am.tokenizer, ids, decode, opts["repeats"])
    finally:
        engine.close()
    ar["model"] = am.name
    return ar


def weight_read(param_bytes: int, bw_gbs: float | None, ms_per_step: float) -> dict[str, Any]:
    if not bw_gbs:
        return dict(bandwidth_gbs=None, bound_ms=None, fraction_achieved=None)
    bound_ms = 1e3 * param_bytes / (bw_gbs * 1e9)
    return dict(bandwidth_gbs=bw_gbs, bound_ms=bound_ms, fraction_achieved=bound_ms / ms_per_step)


def machine_info(device: torch.device) -> dict[str, Any]:
    info = dict(platform=platform.platform(), processor=platform.processor(),
                torch=torch.__version__, threads=torch.get_num_threads())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def print_report(r: dict[str, Any]) -> None:
    m, s, d, a = r["model"], r["settings"], r["diffusion"], r["ar"]
    print(f"model: {m['name']} ({m['params'] / 1e6:.1f}M params, {m['dtype']}, {m['device']})")
    print(f"prompt {s['prompt_tokens']}, reply {s['reply_tokens']}, block {s['block_length']}, "
          f"{s['strategy']}" + (f" {s['tokens_per_step']} tokens/step" if s["tokens_per_step"]
                                else f" >= {s['threshold']}") + f", cache {s['cache']}")
    for name, x in (("diffusion", d), ("AR baseline", a)):
        ttfs = "-" if x["ttfs_ms"] is None else f"{x['ttfs_ms']:.1f} ms"
        print(f"{name:>12}: {x['ms_per_step']:.2f} ms/forward, {x['tokens_per_forward']:.2f} "
              f"tokens/forward, first span {ttfs}, reply {x['reply_ms']:.1f} ms "
              f"({x['reply_tokens']:.0f} tokens, {x['tokens_per_s']:.0f} tokens/s)")
        if x["window_step_ms"] is not None:
            print(f"{'':>12}  cached step {_ms(x['window_step_ms'])}, refresh "
                  f"{_ms(x['refresh_ms'])}, prompt encode {_ms(x['encode_ms'])}")
        nt = x.get("next_turn")
        if nt:
            print(f"{'':>12}  next turn ({nt['cached_prompt_tokens']} prompt tokens cached, "
                  f"{nt['new_prompt_tokens']} new): first span {_ms(nt['ttfs_ms'])}, reply "
                  f"{_ms(nt['reply_ms'])} ({nt['reply_tokens']:.0f} tokens)")
        if x.get("window_forward_gpu_ms") is not None:
            print(f"{'':>12}  their forwards on the GPU: {_ms(x['window_forward_gpu_ms'])}, "
                  f"{_ms(x['refresh_forward_gpu_ms'])}, {_ms(x['encode_forward_gpu_ms'])}")
    print(f"diffusion/AR: {r['ratio']['speed']:.2f}x tokens/s, "
          f"{r['ratio']['reply_time']:.2f}x whole-reply time; peak memory "
          f"{d['peak_mem_mb']:.0f} MiB")
    w = r["weight_read"]
    if w["bound_ms"] is not None:
        print(f"weight-read bound {w['bound_ms']:.2f} ms/step at {w['bandwidth_gbs']:.0f} GB/s: "
              f"{100 * w['fraction_achieved']:.0f}% achieved")
    ss = r["sessions"]
    print(f"{ss['n']} concurrent sessions, next turn ({ss['cached_prompt_tokens']} prompt tokens "
          f"cached, {ss['new_prompt_tokens']} new): each finished in max {ss['max_ms']:.1f} ms, "
          f"mean {ss['mean_ms']:.1f} ms; cold first turn max {ss['cold_max_ms']:.1f} ms")
    g = r["agreement"]
    print(f"token agreement with {g['reference']} (uncached): {100 * g['token_agreement']:.1f}%")


# --- draft re-denoising (`--draft-reuse`) ------------------------------------------------------

# preemptive generation: a draft is made for the partial transcript, then the final one arrives
DRAFT_PAIRS = [
    ("what's the weather", "what's the weather like today"),
    ("can you recommend a good", "can you recommend a good movie"),
    ("what should I cook", "what should I cook for dinner tonight"),
    ("how can I sleep", "how can I sleep better"),
    ("tell me a joke", "tell me a joke about cats"),
    ("what time is it", "what time is it in Tokyo"),
    ("I'm feeling a bit", "I'm feeling a bit tired today"),
    ("do you like music", "do you like music from the eighties"),
    ("what are you reading", "what are you reading at the moment"),
    ("I just got back from", "I just got back from a long walk"),
    ("can you help me plan", "can you help me plan a trip to Paris"),
    ("what's a good book", "what's a good book for the summer"),
    ("how do I make", "how do I make pancakes"),
    ("where should we go", "where should we go this weekend"),
    ("I want to learn", "I want to learn to play the guitar"),
    ("what do you think about", "what do you think about running"),
    ("my friend gave me", "my friend gave me a mystery novel"),
    ("any ideas for a", "any ideas for a birthday present"),
    ("how was your", "how was your day"),
    ("is it going to rain", "is it going to rain tomorrow"),
    ("thanks, and what else", "thanks, and what else would you suggest"),
    ("can we talk about", "can we talk about movies"),
]


def draft_reuse_benchmark(llm: LLMSettings, repeats: int) -> dict[str, Any]:
    """Per pair: a draft for the partial transcript, then the final transcript started over and
    re-denoised from the draft, interleaved (the order alternates per pair and repeat)."""
    engine = DiffusionEngine.from_settings(
        llm.model_copy(update={"engine": llm.engine.model_copy(update={"draft_reuse": True})}))
    try:
        list(engine.stream(_draft_messages(llm, DRAFT_PAIRS[0][1])))  # warm-up
        runs = [_draft_pair(engine, llm, pair, i % 2 == 1)
                for i, pair in enumerate(DRAFT_PAIRS * repeats)]
    finally:
        engine.close()
    return _draft_summary(runs, llm)


def _draft_messages(llm: LLMSettings, text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": llm.system_prompt}, {"role": "user", "content": text}]


def _draft_pair(engine: DiffusionEngine, llm: LLMSettings, pair: tuple[str, str],
                draft_first: bool) -> dict[str, Any]:
    partial, final = (_draft_messages(llm, text) for text in pair)
    draft = [t for span in engine.stream(partial) for t in span.token_ids]
    out: dict[str, Any] = {}
    for name in ("draft", "fresh") if draft_first else ("fresh", "draft"):
        stream = engine.stream(final, draft=draft if name == "draft" else ())
        out[name + "_ids"] = [t for span in stream for t in span.token_ids]
        out[name] = stream.stats
    return out


def _draft_summary(runs: list[dict[str, Any]], llm: LLMSettings) -> dict[str, Any]:
    def side(name: str) -> dict[str, float]:
        stats = [r[name] for r in runs]
        ttfs = [s.ttfs_s for s in stats if s.ttfs_s is not None]
        return dict(ttfs_ms=1e3 * statistics.median(ttfs) if ttfs else None,
                    reply_ms=1e3 * statistics.median(s.total_s for s in stats),
                    nfe=statistics.mean(s.nfe for s in stats),
                    reply_tokens=statistics.mean(s.reply_tokens for s in stats))
    fresh, draft = side("fresh"), side("draft")
    kept = [r["draft"].draft_kept / max(r["draft"].draft_tokens, 1) for r in runs]
    return dict(pairs=len(DRAFT_PAIRS), runs=len(runs), decode=llm.decode.model_dump(),
                cache=llm.engine.cache, fresh=fresh, draft=draft,
                ratio=dict(ttfs=_ratio(fresh["ttfs_ms"], draft["ttfs_ms"]),
                           reply_time=fresh["reply_ms"] / draft["reply_ms"]),
                differs=statistics.mean(r["fresh_ids"] != r["draft_ids"] for r in runs),
                draft_kept=statistics.mean(kept), machine=machine_info(torch.device("cpu")))


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def print_draft_report(r: dict[str, Any]) -> None:
    print(f"{r['runs']} final transcripts ({r['pairs']} pairs), each started over and "
          f"re-denoised from the partial transcript's draft, interleaved")
    for name in ("fresh", "draft"):
        x = r[name]
        ttfs = "-" if x["ttfs_ms"] is None else f"{x['ttfs_ms']:.1f} ms"
        print(f"{name:>6}: first span {ttfs} (median), reply {x['reply_ms']:.1f} ms (median), "
              f"{x['nfe']:.1f} forwards, {x['reply_tokens']:.1f} tokens (mean)")
    ttfs = "-" if r["ratio"]["ttfs"] is None else f"{r['ratio']['ttfs']:.2f}x"
    print(f"fresh/draft: first span {ttfs}, whole reply {r['ratio']['reply_time']:.2f}x "
          f"(> 1: the draft is faster); replies differ in {100 * r['differs']:.0f}% of runs; "
          f"{100 * r['draft_kept']:.0f}% of draft tokens kept at their position")
