"""A name -> object registry that refuses duplicates and lists the valid names when a name is unknown."""
import difflib

from compress.errors import ConfigError


class Registry:
    """Maps names to classes or callables.

    Args:
        kind: what is registered, used in error messages (e.g. "stage", "pruning criterion").
    """

    def __init__(self, kind):
        self.kind = kind
        self._items = {}

    def register(self, name, obj=None):
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted."""
        if obj is None:
            return lambda o: self.register(name, o)
        if name in self._items:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._items[name] = obj
        return obj

    def unregister(self, name):
        """Remove ``name`` (tests that register their own plug-ins clean up with it)."""
        self._items.pop(name, None)

    def get(self, name, where=""):
        """The object registered as ``name``; ConfigError listing the valid names otherwise."""
        if name not in self._items:
            near = difflib.get_close_matches(str(name), list(self._items), n=1, cutoff=0.6)
            hint = f"did you mean '{near[0]}'? " if near else ""
            prefix = f"{where}: " if where else ""
            raise ConfigError(f"{prefix}unknown {self.kind} '{name}'; {hint}valid: {', '.join(self.names())}")
        return self._items[name]

    def names(self):
        return sorted(self._items)

    def __contains__(self, name):
        return name in self._items


# Inference backends (export.backends registers its modules' classes here; tests may add their own)
BACKENDS = Registry("inference backend")
