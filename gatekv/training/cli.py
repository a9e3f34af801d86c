"""Entry points of ``gatekv train`` and ``gatekv validate`` (wired by ``gatekv.cli``; Lightning is imported only
when training starts, so ``import gatekv.cli`` stays light).

    gatekv train configs/train/smollm2-135m-retaining-head.yaml [a.b=c ...]
    gatekv train --help-config            every config key with its type and meaning
    gatekv validate configs/train/*.yaml  check configs (types, files, DeepSpeed JSON) without training
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

__all__ = ["train_main", "validate_main"]

_LOCAL_RANK = re.compile(r"^--local[_-]rank(=\d+)?$")


def _launcher_environment(argv: list[str]) -> list[str]:
    """Undo what the ``deepspeed`` launcher adds: ``--local_rank=N`` in argv (moved to LOCAL_RANK), and set
    NODE_RANK from CROSS_RANK (Lightning reads NODE_RANK; without it node 1's processes get node 0's global ranks)."""
    kept = []
    skip_next = False
    for i, arg in enumerate(argv):
        if skip_next:
            skip_next = False
            continue
        match = _LOCAL_RANK.match(arg)
        if match:
            if match.group(1):
                os.environ.setdefault("LOCAL_RANK", match.group(1)[1:])
            elif i + 1 < len(argv) and argv[i + 1].isdigit():
                os.environ.setdefault("LOCAL_RANK", argv[i + 1])
                skip_next = True
            continue
        kept.append(arg)
    if "CROSS_RANK" in os.environ and "NODE_RANK" not in os.environ:
        os.environ["NODE_RANK"] = os.environ["CROSS_RANK"]
    return kept


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (not the stream of the first call: in-process reruns, captured output)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _log_to_stderr() -> None:
    logger = logging.getLogger("gatekv.training")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[gatekv train] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _help_config() -> str:
    from gatekv.config import describe
    from gatekv.training.config import TrainConfig

    rows = describe(TrainConfig)
    width = max(len(key) for key, _, _ in rows)
    return "\n".join(f"{key:<{width}}  {kind}\n{'':<{width}}  {doc}" for key, kind, doc in rows)


def train_main(argv: list[str] | None = None) -> int:
    """``gatekv train CONFIG [a.b=c ...]``: returns 0 on success, 2 for a bad config or input, 1 for a fault while
    training (disk full, non-finite loss), 143 when stopped by SIGTERM (one line on stderr; ``--debug``: traceback)."""
    from gatekv.errors import debug_requested, run_reporting_errors

    debug, argv = debug_requested(list(sys.argv[1:] if argv is None else argv))
    return run_reporting_errors("gatekv train", lambda: _train(argv), debug)


def _train(argv: list[str]) -> int:
    argv = _launcher_environment(argv)
    parser = argparse.ArgumentParser(prog="gatekv train", description="Train retaining heads / gates on a frozen model.")
    parser.add_argument("config", nargs="?", help="YAML config (configs/train/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="config overrides key.path=value, e.g. trainer.max_steps=50")
    parser.add_argument("--help-config", action="store_true", help="list every config key and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_intermixed_args(argv)
    if args.help_config:
        print(_help_config())
        return 0
    if args.config is None:
        parser.error("a config file is required")
    from gatekv.config import dump_yaml
    from gatekv.training.config import load_train_config

    config = load_train_config(args.config, args.overrides)
    if args.print_config:
        print(dump_yaml(config), end="")
        return 0
    _log_to_stderr()
    from gatekv.training.runner import train

    train(config)
    return 0


def validate_main(argv: list[str] | None = None) -> int:
    """``gatekv validate CONFIG... [--set a.b=c ...]``: 0 if every config is valid, 2 otherwise (one line per file)."""
    from gatekv.errors import debug_requested, one_line

    debug, argv = debug_requested(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(prog="gatekv validate", description="Check training configs without training: "
                                     "everything gatekv train would refuse before loading the model.")
    parser.add_argument("configs", nargs="+", help="YAML config files (a key=value argument is an override)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied to every config (repeatable)")
    parser.add_argument("--no-device-check", action="store_true",
                        help="do not require the configured accelerator here (check a GPU config on a CPU machine)")
    args = parser.parse_args(argv)
    from gatekv.training.config import load_train_config
    from gatekv.training.runner import validate

    # `gatekv validate CONFIG a.b=c` reads like `gatekv train CONFIG a.b=c`: key=value arguments are overrides
    inline = [a for a in args.configs if re.match(r"^[A-Za-z_][\w.]*=", a) and not os.path.exists(a)]
    overrides = list(args.overrides) + inline
    paths = [a for a in args.configs if a not in inline]
    status = 0
    for path in paths:
        try:
            notes = validate(load_train_config(path, overrides), check_device=not args.no_device_check)
        except Exception as error:
            if debug:
                raise
            print(f"{path}: error: {one_line(error)}", file=sys.stderr)
            status = 2
            continue
        print(f"{path}: ok" + "".join(f"\n  note: {n}" for n in notes))
    return status


if __name__ == "__main__":
    sys.exit(train_main())
