"""The library version (recorded in every saved adapter); ``gatekv.__version__`` is this one."""

__version__ = "0.1.0"
