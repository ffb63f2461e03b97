"""Folder layouts as declarations. A class that says where things live under one folder (the server
folder, a site folder, the certificates) lists them as `ca_cert = Entry("ca.crt")` rather than a
property apiece, so the layout reads as the list it is and each name is spelt once."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar, overload

T = TypeVar("T")


class Entry(Generic[T]):
    """An attribute of a frozen folder dataclass: `parts` joined onto its folder (the dataclass's
    only field), passed to `kind` when that is given, e.g. the layout of a subfolder."""

    @overload
    def __init__(self: Entry[Path], *parts: str) -> None: ...

    @overload
    def __init__(self, *parts: str, kind: Callable[[Path], T]) -> None: ...

    def __init__(self, *parts: str, kind: Callable[[Path], Any] = Path) -> None:
        self.parts, self.kind = parts, kind

    @overload
    def __get__(self, folder: None, owner: type) -> Entry[T]: ...

    @overload
    def __get__(self, folder: object, owner: type) -> T: ...

    def __get__(self, folder: object, owner: type) -> Any:
        if folder is None:
            return self
        (field,) = dataclasses.fields(folder)  # type: ignore[arg-type]
        return self.kind(getattr(folder, field.name).joinpath(*self.parts))
