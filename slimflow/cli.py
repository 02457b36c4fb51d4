"""The one `slimflow` entry point.

`slimflow fit|validate|test ...` is a LightningCLI application (see `slimflow.lightning.cli`).
`slimflow prune|eval|report|compare ...` are plain functions whose signatures and docstrings are the schema
(jsonargparse), so `--print_config`, `--config` and `--help` work the same way for them.
Options may be spelled with dashes or underscores (`--num-samples` == `--num_samples`).
"""

from __future__ import annotations

import importlib
import re
import sys

# subcommand -> "module:function"; each function's signature is its command-line schema
FUNCTION_COMMANDS = {
    "prune": "slimflow.commands:prune",
    "eval": "slimflow.evaluation.commands:eval",
    "report": "slimflow.evaluation.commands:report",
    "compare": "slimflow.commands:compare",
    "export": "slimflow.export.commands:export",
}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def _underscore_options(argv: list[str]) -> list[str]:
    out = []
    for arg in argv:
        m = re.match(r"^--([A-Za-z0-9][A-Za-z0-9_.-]*)(=.*)?$", arg)
        out.append(f"--{m.group(1).replace('-', '_')}{m.group(2) or ''}" if m else arg)
    return out


def _load(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def run_function_command(name: str, argv: list[str]):
    from jsonargparse import auto_cli

    func = _load(FUNCTION_COMMANDS[name])
    return auto_cli(func, args=_underscore_options(argv), prog=f"slimflow {name}")


def _usage() -> str:
    names = ", ".join(LIGHTNING_COMMANDS + tuple(FUNCTION_COMMANDS))
    return f"usage: slimflow {{{names}}} [options]   (slimflow SUBCOMMAND --help for details)"


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        print(__doc__)
        return 0 if argv else 2
    command = argv[0]
    if command in FUNCTION_COMMANDS:
        run_function_command(command, argv[1:])
        return 0
    if command in LIGHTNING_COMMANDS or command.startswith("-"):
        from slimflow.lightning.cli import lightning_main

        lightning_main(_underscore_options(argv))
        return 0
    print(f"slimflow: unknown subcommand {command!r}\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
