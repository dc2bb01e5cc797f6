"""An SMTP server on loopback that keeps every message it accepts as a file:
for trying the dispatcher without a mail provider, and for its tests.

  python3 smtp_sink.py --port 2525 --dir /tmp/inbox [--hold-secs N]

Each accepted message is written to DIR as <sequence>.eml before the server
answers 250. With --hold-secs, the server writes DIR/holding, waits that long,
and only then answers: a window in which the message is on the server's side
but the dispatcher has no answer yet (its tests kill it there).
"""

import argparse
import asyncio
import itertools
import os
import signal
from pathlib import Path

from aiosmtpd.controller import Controller


class Keep:
    def __init__(self, directory, hold):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hold = hold
        start = len(list(self.dir.glob("*.eml")))
        self.numbers = itertools.count(start + 1)

    async def handle_DATA(self, server, session, envelope):
        n = next(self.numbers)
        tmp = self.dir / f".{n}.eml.tmp"
        tmp.write_bytes(envelope.original_content or envelope.content)
        os.replace(tmp, self.dir / f"{n:06d}.eml")
        if self.hold:
            (self.dir / "holding").write_text(str(n))
            await asyncio.sleep(self.hold)
        return "250 Message accepted"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2525)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--hold-secs", type=float, default=0)
    args = parser.parse_args()
    controller = Controller(Keep(args.dir, args.hold_secs), hostname=args.host, port=args.port)
    controller.start()
    print(f"listening on {args.host}:{args.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.new_event_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.run_until_complete(stop.wait())
    controller.stop()


if __name__ == "__main__":
    main()
