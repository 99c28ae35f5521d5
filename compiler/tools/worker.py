"""A benchmarked system in a process of its own (`python -m MODULE ARGS...`): one JSON command
per line on its stdin ({"op": ..., "args": {...}}), one JSON answer per line on its stdout; the
first line it prints says it started."""

from __future__ import annotations

import json
import subprocess
import sys


class Worker:
    def __init__(self, module: str, *args, what: str):
        self.process = subprocess.Popen([sys.executable, "-m", module, *map(str, args)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.hello = json.loads(self.process.stdout.readline() or "null")
        if self.hello is None:
            raise RuntimeError(f"the worker for {what} did not start")

    def ask(self, op: str, **args):
        self.process.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()
