"""Run a command in-process through click's test runner, with the real exit-status mapping."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import orjson
from click.testing import CliRunner

from kodepipe.commands import COMMANDS
from kodepipe.commands import cli as kpcli
from kodepipe.core.records import Record


@dataclass
class Result:
    status: int
    stdout: bytes
    stderr: str

    @property
    def records(self) -> list[Record]:
        return [orjson.loads(line) for line in self.stdout.splitlines()]


def invoke(prog: str, *args: str, input: str | bytes | None = None) -> Result:
    command = importlib.import_module(COMMANDS[prog]).cli
    runner = CliRunner()
    with runner.isolation(input=input) as streams:
        try:
            kpcli.run(command, prog, list(args))
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        out = streams[0].getvalue()
        err = streams[1].getvalue() if streams[1] is not None else b""
    return Result(status, out, err.decode())
