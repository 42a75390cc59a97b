"""`diffvoice` command line: one subcommand per job, each defined in its own module.

A command module exposes `add_arguments(parser)` and `run(args, settings) -> int`, and
refuses bad input by raising `llm.settings.UsageError` (printed here as one line, exit
status 2). Only the chosen command's module is imported, so
`diffvoice --help` stays fast. Settings come from `--config` and `--set`, never from
defaults repeated here.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from agent.settings import DEFAULT_CONFIG, load_settings
from llm.settings import LOG_FORMAT, UsageError

# command -> (its module, one line of help); only the chosen command's module is imported
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("agent.serve", "talk to the agent in your browser (WebRTC, local)"),
    "phone": ("agent.phone", "answer phone calls: a Twilio Media Streams WebSocket server"),
    "livekit": ("agent.livekit_worker",
                "serve the agent to a LiveKit server (rooms and SIP phone calls): start | dev"),
    "bench": ("agent.bench", "measure end-to-end turn latency at the client (WebRTC, Twilio, "
                             "in-process), with breakdown"),
    "bench-turns": ("agent.bench_turns", "score finished and cut-off spoken turns with the "
                                         "end-of-turn model, per threshold"),
    "turn-head": ("agent.turn_head", "fit the text turn detector's head: complete replies vs "
                                     "cut-off ones, on chit-chat data"),
    "chat": ("llm.chat", "chat with the diffusion LLM in the terminal, committed spans as they "
                         "land"),
    "bench-llm": ("llm.bench", "diffusion engine speed: ms/step, first span, AR baseline ratio, "
                               "weight-read bound"),
    "train": ("llm.train", "prepare the chit-chat data, or train the diffusion model / AR "
                           "baseline"),
    "eval-model": ("llm.eval", "held-out ELBO vs AR perplexity, and generative perplexity / "
                               "diversity per step count"),
    "distill": ("llm.distill", "write training data whose replies are a teacher's: the AR "
                               "baseline's, or a diffusion model's own"),
    "bench-audio": ("audio.bench", "speech I/O benchmark: speculative final latency, Piper "
                                   "first audio, round-trip WER"),
}


def _top_help() -> str:
    lines = ["usage: diffvoice COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<12} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines.append("\n`diffvoice COMMAND --help` shows a command's options.")
    return "\n".join(lines)


def build_parser(command: str, module) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"diffvoice {command}",
                                     description=COMMANDS[command][1])
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, help="a name in configs/ or a TOML path"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one setting (repeatable), e.g. --set llm.device=cuda",
    )
    module.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"diffvoice: unknown command {command!r}\n\n{_top_help()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    args = build_parser(command, module).parse_args(rest)
    try:
        settings = load_settings(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:  # pydantic's ValidationError is a ValueError
        print(f"diffvoice: bad settings: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    try:
        return int(module.run(args, settings) or 0)
    except UsageError as e:  # the command refused its input: one line, no traceback
        print(f"diffvoice {command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
