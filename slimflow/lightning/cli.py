"""`slimflow fit|validate|test`: a LightningCLI application around `CausalLMModule` and slimflow's callbacks.

One run, one directory: `trainer.default_root_dir` (e.g. `runs/demo`) receives `config.yaml` (the resolved
config), `checkpoints/`, `logs/` (CSV), `pruning_report.md`, `pruning_widths.png`, `pruning.json`,
`metrics.json` and `export/`; `fit` ends with a short summary of the perplexities, parameter counts and these
paths on the terminal. `--ckpt_path last` resumes from `<run>/checkpoints/last.ckpt`: the pruned
architecture is rebuilt from the checkpoint in the callbacks' `setup`, nothing is pruned again.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only

from slimflow.lightning.logs import fit_summary
from slimflow.lightning.module import CausalLMModule
from slimflow.errors import InvalidValueError, MissingInputError, user_error_in


class SlimflowCLI(LightningCLI):
    """LightningCLI with slimflow's run-directory conventions and checkpoint handling (see the module docstring)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.init_args.pretrained", "data.init_args.tokenizer")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:  # jsonargparse wraps a class's own error (missing file, ...): show that one
            cause = error
            while cause.__cause__ is not None:
                cause = cause.__cause__
            if cause is error:
                raise
            raise cause from None

    def instantiate_trainer(self, **kwargs):
        config = self._get(self.config_init, "trainer", default={})
        root = config.get("default_root_dir") or os.getcwd()
        if config.get("logger") in (None, True):
            kwargs.setdefault("logger", CSVLogger(root, name="logs"))
        trainer = super().instantiate_trainer(**kwargs)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        return trainer

    # Subcommands: the resume checkpoint must be known in the callbacks' `setup`, which Lightning runs before it
    # resolves `fit(ckpt_path=...)`, so the path is resolved here and assigned to `trainer.ckpt_path`.
    def fit(self, model, datamodule=None, ckpt_path=None, **kwargs):
        started = time.perf_counter()
        with self._run("config.yaml", ckpt_path), self._launchable():
            self.trainer.fit(model, datamodule=datamodule, **kwargs)
        if self.trainer.is_global_zero:
            print(fit_summary(self.trainer, time.perf_counter() - started), flush=True)

    # Lightning's DDP/FSDP launcher starts the other ranks by running this program again with `sys.argv`
    # (`lightning_main` hides it from LightningCLI's parser): put the command line back while fit runs.
    command_line: tuple[list[str], list[str]] | None = None  # (sys.argv of the program, slimflow's argv)

    @contextlib.contextmanager
    def _launchable(self):
        from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

        if not isinstance(self.trainer.strategy.launcher, _SubprocessScriptLauncher) or self.command_line is None:
            yield
            return
        from slimflow.cli import _method_names, _underscore_options

        program, argv = self.command_line
        if _method_names(_underscore_options(program[1:])) != argv:
            raise InvalidValueError(f"{self.trainer.world_size} processes are started by re-running the command line, "
                             "and this process was not started as `slimflow fit ...`: run `slimflow fit` as a "
                             "command (or under torchrun), not from Python")
        hidden, sys.argv = sys.argv, program
        try:
            yield
        finally:
            sys.argv = hidden

    def validate(self, model, datamodule=None, ckpt_path=None, **kwargs):
        with self._run("config_validate.yaml", ckpt_path):
            self.trainer.validate(model, datamodule=datamodule, **kwargs)

    def test(self, model, datamodule=None, ckpt_path=None, **kwargs):
        with self._run("config_test.yaml", ckpt_path):
            self.trainer.test(model, datamodule=datamodule, **kwargs)

    @contextlib.contextmanager
    def _run(self, config_name: str, ckpt_path: str | None):
        """Resolve the resume checkpoint, save the resolved config, run; a run directory this command created
        is removed again when a user error stops it before any step or prune (no half-made run directories)."""
        root = Path(self.trainer.default_root_dir)
        path = self.last_checkpoint() if ckpt_path == "last" else ckpt_path
        if ckpt_path == "last" and path is None:
            print(f"slimflow: no last checkpoint under {root}; starting from the beginning")
        if path is not None and not os.path.isfile(path):
            raise MissingInputError(f"checkpoint {path!r} not found: check --ckpt_path (or pass --ckpt_path last)")
        created = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
        if rank_zero_only.rank == 0:  # launched ranks run this too (their rank is known from the environment)
            self._parser(self.subcommand).save(self.config[self.subcommand], str(root / config_name),
                                               skip_none=False, overwrite=True)
        self.trainer.ckpt_path = path
        try:
            yield
        except Exception as error:
            untouched = self.trainer.global_step == 0 and not (root / "pruning.json").exists()
            if created and untouched and rank_zero_only.rank == 0 and user_error_in(error) is not None:
                shutil.rmtree(root, ignore_errors=True)
            raise

    def last_checkpoint(self) -> str | None:
        """The newest `last*.ckpt` in the checkpoint callbacks' directories."""
        found = [p for cb in self.trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath
                 for p in Path(cb.dirpath).glob(f"{cb.CHECKPOINT_NAME_LAST}*{cb.FILE_EXTENSION}")]
        return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None


def lightning_main(argv: list[str] | None = None) -> SlimflowCLI:
    """Run `slimflow fit|validate|test ARGS` (argv without the program name). A bare `--print_config` prints
    the config with the documentation of every option as comments (needs `ruamel.yaml`)."""
    comments = "--print_config=comments" if importlib.util.find_spec("ruamel") else "--print_config"
    argv = [comments if a == "--print_config" else a for a in (argv or [])]
    program, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees both `args` and sys.argv
    SlimflowCLI.command_line = (program, argv)
    try:
        # no abbreviated options: `--trainer.max_epoch` is refused like the same typo in a YAML config
        strict = {"allow_abbrev": False}
        return SlimflowCLI(model_class=CausalLMModule, subclass_mode_model=True, subclass_mode_data=True,
                           save_config_callback=None, seed_everything_default=42, auto_configure_optimizers=False,
                           parser_kwargs={**strict, "prog": "slimflow",
                                          **{name: strict for name in SlimflowCLI.subcommands()}},
                           args=argv)
    finally:
        sys.argv = program
