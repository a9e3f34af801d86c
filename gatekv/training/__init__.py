"""Training of retaining heads and gates on a frozen model (``gatekv train``).

Importing this package is light: Lightning, DeepSpeed, datasets and peft are imported only by the functions that
need them (``train``, the data loaders, the Lightning module).

    from gatekv.training import load_train_config, train
    result = train(load_train_config("configs/train/smollm2-135m-retaining-head.yaml", ["trainer.max_steps=50"]))
"""

from gatekv.training.config import TrainConfig, load_train_config

__all__ = ["TrainConfig", "load_train_config", "train", "train_main", "validate", "validate_main"]


def train(config):
    """Run training (see :func:`gatekv.training.runner.train`)."""
    from gatekv.training.runner import train as _train

    return _train(config)


def validate(config):
    """Check a config without training (see :func:`gatekv.training.runner.validate`)."""
    from gatekv.training.runner import validate as _validate

    return _validate(config)


def train_main(argv=None) -> int:
    from gatekv.training.cli import train_main as _main

    return _main(argv)


def validate_main(argv=None) -> int:
    from gatekv.training.cli import validate_main as _main

    return _main(argv)
