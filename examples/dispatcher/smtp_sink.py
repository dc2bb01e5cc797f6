"""An SMTP server on loopback that keeps every message it accepts as a file:
for trying the dispatcher without a mail provider, and for its tests.

  python3 smtp_sink.py --port 2525 --dir /tmp/inbox [--hold-secs N]
                       [--tls starttls|implicit --cert CERT.pem --key KEY.pem]

Each accepted message is written to DIR as <sequence>.eml before the server
answers 250. With --hold-secs, the server writes DIR/holding, waits that long,
and only then answers: a window in which the message is on the server's side
but the dispatcher has no answer yet (its tests kill it there).

With --tls, it offers STARTTLS, or speaks TLS from the first byte (implicit,
as on port 465), with the given certificate. It always offers AUTH, even
before TLS, accepts any credentials, and notes each attempt in DIR/auth.log
with whether the session was encrypted: a client that logs in over a plain
connection shows there.
"""

import argparse
import asyncio
import itertools
import os
import signal
import ssl
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult


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
        (self.dir / "recipients.log").open("a").write(" ".join(envelope.rcpt_tos) + "\n")
        if self.hold:
            (self.dir / "holding").write_text(str(n))
            await asyncio.sleep(self.hold)
        return "250 Message accepted"


class NoteAuth:
    """Accepts any login, noting it and whether it came over TLS."""

    def __init__(self, directory):
        self.log = Path(directory) / "auth.log"

    def __call__(self, server, session, envelope, mechanism, auth_data):
        # After STARTTLS the transport is the TLS one; with implicit TLS it
        # always was.
        encrypted = server.transport.get_extra_info("ssl_object") is not None
        with self.log.open("a") as f:
            f.write(f"{mechanism} {'tls' if encrypted else 'plain'}\n")
        return AuthResult(success=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2525)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--hold-secs", type=float, default=0)
    parser.add_argument("--tls", choices=["none", "starttls", "implicit"], default="none")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    args = parser.parse_args()
    tls = {}
    if args.tls != "none":
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)
        tls = {"tls_context": context} if args.tls == "starttls" else {"ssl_context": context}
    controller = Controller(
        Keep(args.dir, args.hold_secs),
        hostname=args.host,
        port=args.port,
        authenticator=NoteAuth(args.dir),
        auth_require_tls=False,
        **tls,
    )
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
