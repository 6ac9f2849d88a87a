"""Hooks on a model held for a ``with`` block: the one lifecycle of the collector and the experts."""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.hooks import RemovableHandle


class Hooks:
    """Registers hooks on entry and always removes them: on exit, and also when registering one of
    them or the block fails. A hook left behind would keep running, and holding activations, in
    every later forward of the user's model.

    A subclass yields the handle of each hook it registers from :meth:`register`.
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def register(self) -> Iterator[RemovableHandle]:
        raise NotImplementedError

    def __enter__(self):
        try:
            for handle in self.register():  # one at a time, so a failure still removes the earlier ones
                self._handles.append(handle)
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook; safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def active(self) -> bool:
        return bool(self._handles)
