"""One small registry type: scorers, allocators, mergers and head types are found by name through it.

    SCORERS = Registry("scorer", Scorer)

    @SCORERS.register("snapkv")
    class SnapKV(Scorer): ...

    SCORERS.get("snapkv", window=32)      # an instance; options checked against the constructor
    SCORERS.names()                       # sorted names

Built-in entries register when their package is imported; importing any module of the package (``gatekv.scorers
.base``) runs the package's ``__init__`` first, so lookups always see them.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from gatekv.config import check_options

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Named classes of one kind.

    kind:      what an entry is, in messages (``scorer``, ``allocator``, ``merger``, ``head type``)
    base:      the class every entry derives from; :meth:`get` passes instances of it through
    attribute: the class attribute :meth:`register` sets to the name (``name``)
    """

    def __init__(self, kind: str, base: type, attribute: str = "name"):
        self.kind = kind
        self.base = base
        self.attribute = attribute
        self._classes: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type], type]:
        """Class decorator: make the class available under ``name`` (``ValueError`` if the name is taken)."""

        def decorate(cls: type) -> type:
            self.add(name, cls)
            return cls

        return decorate

    def add(self, name: str, cls: type, replace: bool = False) -> None:
        """Register ``cls`` under ``name``; ``replace``: a later definition of the same name wins (subclassing)."""
        if name in self._classes and not replace:
            raise ValueError(f"{self.kind} name {name!r} is already registered")
        setattr(cls, self.attribute, name)
        self._classes[name] = cls

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._classes)

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def cls(self, name: str) -> type:
        """The class registered as ``name`` (``ValueError`` listing the valid names)."""
        if name not in self._classes:
            raise ValueError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return self._classes[name]

    def get(self, name_or_instance: str | T, **options) -> T:
        """An instance from its registered name and constructor options, or the instance itself (no options)."""
        if isinstance(name_or_instance, self.base):
            if options:
                article = "an" if self.kind[0] in "aeiou" else "a"
                raise ValueError(f"{self.kind} options {sorted(options)} given together with {article} {self.kind} "
                                 "instance")
            return name_or_instance
        cls = self.cls(name_or_instance)
        check_options(self.kind, name_or_instance, cls, options)
        return cls(**options)
