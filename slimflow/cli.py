"""The one `slimflow` entry point.

`slimflow fit|validate|test ...` is a LightningCLI application (see `slimflow.lightning.cli`).
`slimflow prune|eval|report|compare|export ...` are plain functions whose signatures and docstrings are the schema
(jsonargparse), so `--print_config`, `--config` and `--help` work the same way for them.
Options may be spelled with dashes or underscores (`--num-samples` == `--num_samples`); they are never
abbreviated (`--trainer.max_epoch` is an error, as in a YAML config). A boolean option given without a value
means true (`--overwrite` == `--overwrite true`).

Errors in what was asked for (a value, a path, a model; `slimflow.errors.SlimflowUserError`) print one line
`error: ...` and exit with status 2; `--debug` (or SLIMFLOW_DEBUG=1) shows their traceback too. So does a CUDA
out-of-memory error (what to lower, `slimflow.errors.out_of_memory_in`). Any other exception is a defect and
keeps its traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import os
import re
import sys
import traceback
from pathlib import Path

# subcommand -> "module:function"; each function's signature is its command-line schema
FUNCTION_COMMANDS = {
    "prune": "slimflow.commands:prune_command",
    "eval": "slimflow.evaluation.commands:eval",
    "report": "slimflow.evaluation.commands:report",
    "compare": "slimflow.commands:compare",
    "export": "slimflow.export.commands:export",
}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
SUMMARIES = {
    "prune": "prune a model once (layer-wise, no finetuning) and save a smaller checkpoint that reloads",
    "fit": "prune, finetune with LoRA, evaluate and export in one Lightning run (configs/*.yaml)",
    "validate": "validation loop of a (pruned) model or a fit checkpoint (--ckpt_path)",
    "test": "test loop of a (pruned) model or a fit checkpoint (--ckpt_path)",
    "predict": "prediction loop (LightningCLI)",
    "eval": "perplexity and zero-shot accuracy of any model directory; writes metrics.json",
    "report": "one table and plots comparing evaluated runs (slimflow report RUN_DIR [RUN_DIR ...])",
    "compare": "prune one model with several methods and ratios, and compare their perplexity",
    "export": "write a (pruned) model as one GGUF file for llama.cpp, llama-server and Ollama",
}
DEBUG_ENV = "SLIMFLOW_DEBUG"  # same name as slimflow.errors.DEBUG_ENV
BOOL_VALUES = {"true", "false", "yes", "no", "1", "0", "on", "off"}


def _underscore_options(argv: list[str]) -> list[str]:
    out = []
    for arg in argv:
        m = re.match(r"^--([A-Za-z0-9][A-Za-z0-9_.-]*)(=.*)?$", arg)
        out.append(f"--{m.group(1).replace('-', '_')}{m.group(2) or ''}" if m else arg)
    return out


def _method_names(argv: list[str]) -> list[str]:
    """`--method llm-surgeon` -> `--method llm_surgeon` (also `--trainer.callbacks.method ...`): the spelling
    under which jsonargparse finds the method's options class (`slimflow.method_options`)."""
    from slimflow.method_options import command_line_name

    out = []
    for i, arg in enumerate(argv):
        m = re.match(r"^(--(?:[A-Za-z0-9_.]*\.)?method(?:\.help)?)=(.*)$", arg)
        if m:
            arg = f"{m.group(1)}={command_line_name(m.group(2))}"
        elif i and re.match(r"^--(?:[A-Za-z0-9_.]*\.)?method(?:\.help)?$", argv[i - 1]):
            arg = command_line_name(arg)
        out.append(arg)
    return out


def _check_method_options(argv: list[str], default: str = "slimgpt") -> None:
    """`--method NAME --method.OPTION VALUE ...` of a function command: an unknown option or a value of the wrong
    type is a one-line `InvalidValueError` naming the method's options (jsonargparse would explain its union)."""
    import yaml

    from slimflow.method_options import BUILTIN

    name, values, i = default, {}, 0
    while i < len(argv):
        m = re.match(r"^--method(?:\.(\w+))?(?:=(.*))?$", argv[i])
        if m and m.group(1) != "help":
            value = m.group(2)
            if value is None and i + 1 < len(argv):
                value, i = argv[i + 1], i + 1
            if m.group(1) is None:
                name, values = value, {}
            elif value is not None:
                try:
                    values[m.group(1)] = yaml.safe_load(value)
                except yaml.YAMLError:
                    values[m.group(1)] = value
        i += 1
    cls = next((c for c in BUILTIN if name in (c.method, c.__name__)), None)
    if cls is not None and values:
        cls.build(values)


def _check_config_method_options(argv: list[str]) -> None:
    """The same one-line check for the `method` of a `StructuredPruning` callback in a `--config` YAML of `fit` (a
    mistyped option there would otherwise be explained by jsonargparse through every Callback type)."""
    import yaml

    from slimflow.method_options import BUILTIN

    paths = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    paths += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for path in paths:
        try:
            config = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError):
            continue  # the parser reports it
        callbacks = ((config or {}).get("trainer") or {}).get("callbacks") if isinstance(config, dict) else None
        for callback in callbacks if isinstance(callbacks, list) else []:
            spec = callback.get("init_args", {}).get("method") if isinstance(callback, dict) else None
            if not (isinstance(spec, dict) and str(callback.get("class_path", "")).endswith("StructuredPruning")):
                continue
            name = str(spec.get("class_path", "")).rsplit(".", 1)[-1]
            cls = next((c for c in BUILTIN if name in (c.method, c.__name__)), None)
            if cls is not None and isinstance(spec.get("init_args"), dict):
                cls.build(spec["init_args"])


def _bare_flags(argv: list[str], flags: set[str]) -> list[str]:
    """`--overwrite` without a value means `--overwrite true` for the boolean options in `flags`."""
    out = []
    for i, arg in enumerate(argv):
        following = argv[i + 1] if i + 1 < len(argv) else None
        if arg.startswith("--") and arg[2:] in flags and (following is None or following.lower() not in BOOL_VALUES):
            arg += "=true"
        out.append(arg)
    return out


def _join_positionals(argv: list[str]) -> list[str]:
    """`report a b,c --output x` -> `report a,b,c --output x` (the command takes one comma-separated list)."""
    positionals, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-"):
            rest.append(arg)
            if "=" not in arg and arg not in ("-h", "--help") and i + 1 < len(argv):
                rest.append(argv[i + 1])
                i += 1
        else:
            positionals.append(arg)
        i += 1
    return ([",".join(positionals)] if positionals else []) + rest


def _load(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def run_function_command(name: str, argv: list[str]):
    from jsonargparse import auto_cli

    func = _load(FUNCTION_COMMANDS[name])
    flags = {p.name for p in inspect.signature(func).parameters.values() if p.annotation in (bool, "bool", "bool | None")}
    argv = _method_names(_bare_flags(_underscore_options(argv), flags))
    if name == "report":
        argv = _join_positionals(argv)
    if "method" in inspect.signature(func).parameters:
        _check_method_options(argv)
    return auto_cli(func, args=argv, prog=f"slimflow {name}", description=f"slimflow {name}: {SUMMARIES[name]}.",
                    allow_abbrev=False)


def _usage() -> str:
    width = max(map(len, SUMMARIES))
    lines = [f"usage: slimflow SUBCOMMAND [options]   (slimflow SUBCOMMAND --help for its options)", "",
             "subcommands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, summary in SUMMARIES.items()]
    lines += ["", "  --debug  show the traceback of an error (also SLIMFLOW_DEBUG=1)"]
    return "\n".join(lines)


def _help_cache(argv: list[str]) -> Path:
    """Where the help text of `slimflow fit --help` (etc.) is kept: keyed by the command, the installed versions
    of what shapes the parser, and the size and modification time of every slimflow source file."""
    from importlib.metadata import PackageNotFoundError, version

    key = hashlib.sha256(" ".join(argv).encode())
    for package in ("lightning", "jsonargparse", "transformers", "torch", "peft"):
        try:
            key.update(f"{package}={version(package)}".encode())
        except PackageNotFoundError:
            key.update(package.encode())
    for source in sorted(Path(__file__).parent.rglob("*.py")):
        stat = source.stat()
        key.update(f"{source.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "slimflow" / "help" / f"{argv[0]}-{key.hexdigest()[:16]}.txt"


def _cached_help(argv: list[str]) -> int:
    """`slimflow fit --help` builds its text from Lightning, which takes seconds to import: the text is kept
    after the first call and printed from there while nothing it depends on has changed."""
    cache = _help_cache(argv)
    if cache.is_file():
        sys.stdout.write(cache.read_text())
        return 0
    from slimflow.lightning.cli import lightning_main

    buffer = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(buffer):
        try:
            lightning_main(argv)
        except SystemExit as exit_:
            code = exit_.code or 0
    text = buffer.getvalue()
    if code == 0 and text:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_suffix(f".{os.getpid()}.partial")
            partial.write_text(text)
            partial.replace(cache)
        except OSError:  # a read-only home: the help is still printed, only not kept
            pass
    sys.stdout.write(text)
    return code


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command = argv[0]
    if command in FUNCTION_COMMANDS:
        run_function_command(command, argv[1:])
        return 0
    if command in LIGHTNING_COMMANDS and argv[1:] in (["--help"], ["-h"]):
        return _cached_help(argv)
    if command in LIGHTNING_COMMANDS or command.startswith("-"):
        _check_config_method_options(argv)
        from slimflow.lightning.cli import lightning_main

        lightning_main(_method_names(_underscore_options(argv)))
        return 0
    print(f"error: unknown subcommand {command!r}\n\n{_usage()}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run `slimflow ARGV` and return the exit status (0, or 2 for a user error; defects raise)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0", "false")
    argv = [a for a in argv if a != "--debug"]
    try:
        return _dispatch(argv)
    except SystemExit as exit_:  # the parsers' own exits (--help, usage errors) become return values
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    except Exception as error:  # noqa: BLE001 - classify, then re-raise defects unchanged
        from slimflow.errors import out_of_memory_in, user_error_in

        user_error = user_error_in(error) or out_of_memory_in(error)
        if user_error is None:
            raise
        if debug:
            traceback.print_exception(error)
        print(f"error: {user_error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
