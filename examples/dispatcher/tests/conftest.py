"""The dispatcher against a real RabbitMQ and a real SMTP server (smtp_sink.py):
each test gets queues of its own (named like the project's tests' objects,
t<12 hex>.email…, which the tests' dispatcher broker user may read), an inbox
of its own, and a dispatcher process run as that user.

The broker URLs come from the README's test command (scripts/test.sh):
AMQP_URL (an administrator, to declare and publish) and
TEST_DISPATCHER_AMQP_URL (the dispatcher's user).
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pika
import pytest

HERE = Path(__file__).resolve().parent.parent
ADMIN = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
DISPATCHER = os.environ.get(
    "TEST_DISPATCHER_AMQP_URL",
    "amqp://profile-dispatcher-test:profile-dispatcher-test@127.0.0.1:5672/%2f",
)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, within=20.0, what="the condition"):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"{what} within {within} s")


class Broker:
    """A test's dispatch queue and dead-letter exchange, declared as the worker does."""

    def __init__(self):
        self.prefix = "t" + uuid.uuid4().hex[:12]
        self.queue = f"{self.prefix}.email.dispatch"
        self.dlx = f"{self.prefix}.email.dlx"
        self.dead = f"{self.prefix}.email.dispatch.dead"
        self.conn = pika.BlockingConnection(pika.URLParameters(ADMIN))
        self.ch = self.conn.channel()
        self.ch.confirm_delivery()
        self.ch.exchange_declare(self.dlx, "fanout", durable=True)
        self.ch.queue_declare(self.dead, durable=True, arguments={"x-queue-type": "quorum"})
        self.ch.queue_bind(self.dead, self.dlx)
        self.ch.queue_declare(self.queue, durable=True, arguments={
            "x-queue-type": "quorum", "x-dead-letter-exchange": self.dlx,
        })

    def publish(self, event, traceparent=None):
        headers = {"traceparent": traceparent} if traceparent else {}
        self.ch.basic_publish("", self.queue, json.dumps(event).encode(), pika.BasicProperties(
            message_id=event["id"], content_type="application/json", delivery_mode=2, headers=headers,
        ))

    def dead_letters(self):
        out = []
        while True:
            method, props, body = self.ch.basic_get(self.dead, auto_ack=True)
            if method is None:
                return out
            out.append((props.headers or {}, json.loads(body)))

    def close(self):
        for q in (self.queue, self.dead):
            self.ch.queue_delete(q)
        self.ch.exchange_delete(self.dlx)
        self.conn.close()


def event(to="jane.doe@example.com", tenant="default", locale=None, template="verify-account"):
    token = str(uuid.uuid4())
    e = {
        "id": str(uuid.uuid4()), "tenant": tenant, "profileId": "p1", "to": to, "template": template,
        "tokenId": token, "verificationLink": f"https://example.com/verify?tokenId={token}",
        "timestamp": 1495746285875,
    }
    if locale is not None:
        e["locale"] = locale
    return e


class Smtp:
    """smtp_sink.py on a port of its own, its inbox a folder."""

    def __init__(self, inbox, port=None):
        self.inbox = Path(inbox)
        self.port = port or free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "smtp_sink.py"), "--port", str(self.port), "--dir", str(self.inbox)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        assert self.proc.stdout.readline().startswith("listening")

    def mail(self):
        return [p.read_text() for p in sorted(self.inbox.glob("*.eml"))]

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


class Dispatcher:
    """dispatcher.py as the dispatcher's broker user, logging JSON to a file."""

    def __init__(self, broker, smtp_port, tmp, **env):
        self.http = f"127.0.0.1:{free_port()}"
        self.log = Path(tmp) / f"dispatcher-{uuid.uuid4().hex[:6]}.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("SMTP_", "OTEL_"))}
        environ.update({
            "AMQP_URL": DISPATCHER, "EMAIL_QUEUE": broker.queue, "EMAIL_DEAD_LETTER_EXCHANGE": broker.dlx,
            "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(smtp_port), "SMTP_TIMEOUT_SECS": "5",
            "MAIL_FROM": "Example <no-reply@example.com>", "DEDUPE_DB": str(Path(tmp) / "claims.sqlite3"),
            "METRICS_ADDR": self.http, "RETRY_MIN_MS": "100", "RETRY_MAX_MS": "300",
        })
        environ.update(env)
        self.proc = subprocess.Popen([sys.executable, str(HERE / "dispatcher.py")], env=environ,
                                     stdout=subprocess.DEVNULL, stderr=self.log.open("w"))
        wait_until(lambda: any(l.get("message") == "consuming" for l in self.lines()), what="consuming")

    def lines(self):
        out = []
        for raw in self.log.read_text().splitlines() if self.log.exists() else []:
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError:
                out.append({"message": raw, "not_json": True})
        return out

    def get(self, path):
        try:
            with urllib.request.urlopen(f"http://{self.http}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metric(self, name):
        _, text = self.get("/metrics")
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self):
        self.proc.terminate()
        self.proc.wait(20)


@pytest.fixture
def broker():
    b = Broker()
    yield b
    b.close()


@pytest.fixture
def smtp(tmp_path):
    s = Smtp(tmp_path / "inbox")
    yield s
    s.stop()


@pytest.fixture
def start(broker, smtp, tmp_path):
    started = []

    def run(**env):
        d = Dispatcher(broker, smtp.port, tmp_path, **env)
        started.append(d)
        return d

    yield run
    for d in started:
        if d.proc.poll() is None:
            d.stop()
