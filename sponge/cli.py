"""The `sponge` command line: one subcommand per job, each defined in the module that does it.

A command module exposes `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`.
Modules are imported only when their command runs, so `sponge --help` stays fast and a
missing optional extra never breaks an unrelated command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: name -> (module path, one-line help). The module supplies the arguments and the work.
COMMANDS: dict[str, tuple[str, str]] = {
    "broker": ("sponge.streams.broker", "run the embedded Kafka-compatible broker in the foreground"),
    "produce": ("sponge.streams.synthetic", "send synthetic rollouts (optionally malformed ones) to a topic"),
    "serve": ("sponge.service.server", "run the service: ingest from Kafka, curate the replay subset, serve replay over HTTP"),
    "sql": ("sponge.store.sql_cli", "run a read-only SQL query over the rollout store"),
    "store": ("sponge.store.cli", "look after a rollout store: stats, migrate an older format, lower a retention mark"),
    "train": ("sponge.trainer.cli", "train a tiny model on a toy task with ReMix or GRPO"),
    "demo": ("sponge.demo", "the end-to-end demo: broker, service and trainer on a toy task"),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where it informs: not for on/off flags, not for None, not twice."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sponge",
        description="Streaming data selection and replay curation for RL fine-tuning of language models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_path, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text,
                             formatter_class=_HelpFormatter)
        if name == load:
            module = importlib.import_module(module_path)
            module.add_arguments(cmd)
            cmd.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(load=chosen if chosen in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
