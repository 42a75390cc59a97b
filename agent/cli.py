"""`diffvoice` command line: one subcommand per job, each defined in its own module.

A command module exposes `HELP` (one line), `add_arguments(parser)` and
`run(args, settings) -> int`, and refuses bad input by raising `llm.settings.UsageError`
(printed here as one line, exit status 2). Only the chosen command's module is imported, so
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

COMMANDS: dict[str, str] = {
    "serve": "agent.serve",
    "phone": "agent.phone",
    "livekit": "agent.livekit_worker",
    "bench": "agent.bench",
    "bench-turns": "agent.bench_turns",
    "turn-head": "agent.turn_head",
    "chat": "llm.chat",
    "bench-llm": "llm.bench",
    "train": "llm.train",
    "eval-model": "llm.eval",
    "distill": "llm.distill",
    "bench-audio": "audio.bench",
}


def _top_help() -> str:
    lines = ["usage: diffvoice COMMAND [options]", "", "commands:"]
    for name, module in COMMANDS.items():
        try:
            summary = importlib.import_module(module).HELP
        except ImportError:
            continue  # a command whose module is not installed yet is not listed
        lines.append(f"  {name:<12} {summary}")
    lines.append("\n`diffvoice COMMAND --help` shows a command's options.")
    return "\n".join(lines)


def build_parser(command: str, module) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"diffvoice {command}", description=module.HELP)
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
    module = importlib.import_module(COMMANDS[command])
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
