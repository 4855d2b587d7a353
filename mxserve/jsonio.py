"""Atomic, versioned JSON files: every data format of mxserve goes through here."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from typing import Any, ClassVar, TypeVar

from mxserve.errors import MxServeError


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` to ``path`` atomically (temp file in the same folder, then rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_versioned(path: str, fmt: str, version: int, what: str) -> dict:
    """Read a JSON file of format ``fmt``; a missing, corrupt or foreign file is a clear error."""
    if not os.path.isfile(path):
        raise MxServeError(f"{what} file {path} does not exist")
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MxServeError(f"{what} file {path} is not valid JSON ({e})") from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise MxServeError(f"{path} is not a {what} file (expected format {fmt!r})")
    if obj.get("version") != version:
        raise MxServeError(
            f"{path}: {what} version {obj.get('version')!r} is not supported (this mxserve reads {version})"
        )
    return obj


def corrupt(path: str, what: str, err: Exception) -> MxServeError:
    return MxServeError(f"{what} file {path} is corrupt: {type(err).__name__}: {err}")


V = TypeVar("V", bound="Versioned")


class Versioned:
    """Base of mxserve's data formats (dataclasses): the JSON form is the fields beside ``format`` and
    ``version``. A subclass names FORMAT, VERSION and WHAT (its name in messages) and reads its fields
    in ``from_json``; ``load`` turns a malformed file into one clear error."""

    FORMAT: ClassVar[str]
    VERSION: ClassVar[int]
    WHAT: ClassVar[str]

    def to_json(self) -> dict:
        return {"format": self.FORMAT, "version": self.VERSION, **asdict(self)}

    def save(self, path: str) -> None:
        write_json(path, self.to_json())

    @classmethod
    def from_json(cls: type[V], obj: dict) -> V:
        raise NotImplementedError

    @classmethod
    def load(cls: type[V], path: str) -> V:
        obj = read_versioned(path, cls.FORMAT, cls.VERSION, cls.WHAT)
        try:
            return cls.from_json(obj)
        except (KeyError, TypeError, ValueError, MxServeError) as e:
            raise corrupt(path, cls.WHAT, e) from None
