"""The lab mirror's HTTP server: the mirror directory, read-only, with the bytes served per file counted.

The lab's stand-in for the internet, so a test can tell how often a deploy fetched each artifact
(issue 13: one download per artifact per fleet). Standard library only: the system interpreter runs it as
`nobody`. The counts are rewritten after every request, atomically, as {"served": {"<path>": bytes}}.

    python3 mirror_server.py --bind 10.77.0.1 --port 8088 --directory DIR --counts FILE
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

_lock = threading.Lock()
_served: dict[str, int] = {}


class CountingHandler(SimpleHTTPRequestHandler):
    counts_file = ""

    def copyfile(self, source, outputfile) -> None:
        sent = 0
        try:
            while chunk := source.read(1 << 20):
                outputfile.write(chunk)
                sent += len(chunk)
        finally:  # a client that hangs up mid-file still received what was sent
            self._count(sent)

    def _count(self, sent: int) -> None:
        path = self.path.split("?", 1)[0]
        with _lock:
            _served[path] = _served.get(path, 0) + sent
            tmp = f"{self.counts_file}.tmp"
            with open(tmp, "w", encoding="utf-8") as out:
                json.dump({"served": _served}, out, sort_keys=True)
            os.replace(tmp, self.counts_file)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        super().log_message(format, *args)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bind", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--directory", required=True)
    parser.add_argument("--counts", required=True)
    args = parser.parse_args()
    CountingHandler.counts_file = args.counts
    handler = functools.partial(CountingHandler, directory=args.directory)
    ThreadingHTTPServer((args.bind, args.port), handler).serve_forever()


if __name__ == "__main__":
    main()
