"""A reference email dispatcher for profile-worker's `email.requested` events.

It reads the dispatch queue (`profile.email.dispatch`) as the dispatcher's
broker user, renders the event's template (`verify-account` or
`reset-password`, text and HTML, the link as it came), sends it through SMTP,
and acks the event only once the SMTP server has accepted the message.

What holds (README.md, "Guarantees"): at most one email per event. Before it
sends, the dispatcher claims the event's message_id in a table of its own
(SQLite); after the SMTP server accepts, it marks it sent; only then it acks.
A redelivered event already marked sent is acked without sending. One whose
claim is there but not its mark (the dispatcher died while sending, or the
connection broke after the message was handed over) is not sent again: it is
dead-lettered with that reason, for an operator to look at the inbox and
replay it or not.

While the SMTP server is down (or answers 4xx), the event is retried with
jittered exponential backoff, unacked (so nothing is lost if the dispatcher
dies meanwhile), up to SMTP_MAX_ATTEMPTS; then, or at once for a permanent
refusal (5xx) or a malformed event, it is dead-lettered to the dispatch
queue's dead-letter exchange with `x-error-code` and `x-error-reason`.

Run: `python3 dispatcher.py` (consume until SIGTERM), or
`python3 dispatcher.py forget MESSAGE_ID…` (before replaying a dead letter
whose email never arrived).

Settings (environment):
  AMQP_URL                   the dispatcher's broker user (amqp://…/vhost)
  EMAIL_QUEUE                default profile.email.dispatch
  EMAIL_DEAD_LETTER_EXCHANGE default <EMAIL_EXCHANGE>.dlx = profile.email.dlx
  SMTP_HOST                  default 127.0.0.1
  SMTP_TLS                   starttls | implicit | none: STARTTLS after connecting, TLS
                             from the first byte (port 465), or none. Default: starttls,
                             except for a loopback host (none). The certificate and the
                             host name are always verified (Python's default context).
                             (SMTP_STARTTLS=1, the older setting, means starttls.)
  SMTP_CA_FILE               PEM file of the CA the server's certificate chains to (a
                             private CA), instead of the system's
  SMTP_PORT                  default 587 (starttls), 465 (implicit), 25 (none)
  SMTP_USER, SMTP_PASSWORD   log in when set; never over an unencrypted connection (the
                             dispatcher refuses to start with SMTP_USER and SMTP_TLS=none)
  SMTP_TIMEOUT_SECS          default 10
  SMTP_MAX_ATTEMPTS          sending attempts per event before it is dead-lettered (default 20)
  RETRY_MIN_MS, RETRY_MAX_MS backoff between attempts (default 1000, 60000; jittered)
  MAIL_FROM                  the sender, e.g. "Example <no-reply@example.com>" (required)
  SUBJECT_VERIFY_ACCOUNT     default "Verify your account"
  SUBJECT_RESET_PASSWORD     default "Reset your password"
  TEMPLATES_DIR              default ./templates beside this file (<template>.txt and .html)
  DEDUPE_DB                  SQLite file of the claims (default ./dispatcher-sent.sqlite3)
  DEDUPE_RETENTION_DAYS      claims older than this are forgotten (default 7)
  METRICS_ADDR               host:port of /metrics (default 127.0.0.1:9465; "off": none)
"""

import email.message
import email.utils
import ipaddress
import json
import logging
import os
import random
import signal
import smtplib
import socket
import sqlite3
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jinja2
import pika

log = logging.getLogger("dispatcher")

TEMPLATES = ("verify-account", "reset-password")
REQUIRED_FIELDS = ("to", "template", "verificationLink", "tokenId", "profileId", "tenant")


def env(name, default=None):
    value = os.environ.get(name, "")
    return value if value != "" else default


def is_loopback(host):
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# What separates, quotes or brackets addresses: none of it is in one bare address.
NOT_IN_AN_ADDRESS = set(',;<>()"[]\\:') | {chr(c) for c in range(0x21)} | {"\x7f"}


def single_address(to):
    """`to` when it is one bare address (name@domain), else None: a list, a
    display name (which can hide a second address), a comment or a route
    would carry the link to more than one inbox."""
    if not isinstance(to, str) or any(c in NOT_IN_AN_ADDRESS for c in to):
        return None
    local, at, domain = to.partition("@")
    if not at or not local or not domain or "@" in domain:
        return None
    parsed = email.utils.getaddresses([to])
    if parsed != [("", to)]:
        return None
    return to


class Settings:
    def __init__(self):
        self.amqp_url = env("AMQP_URL", "amqp://profile-email-dispatcher:profile-email-dispatcher@127.0.0.1:5672/%2f")
        self.queue = env("EMAIL_QUEUE", "profile.email.dispatch")
        self.dead_letter_exchange = env("EMAIL_DEAD_LETTER_EXCHANGE", "profile.email.dlx")
        self.smtp_host = env("SMTP_HOST", "127.0.0.1")
        default_tls = "none" if is_loopback(self.smtp_host) else "starttls"
        if env("SMTP_STARTTLS") == "1":
            default_tls = "starttls"
        self.smtp_tls = env("SMTP_TLS", default_tls)
        if self.smtp_tls not in ("starttls", "implicit", "none"):
            raise SystemExit(f"SMTP_TLS: {self.smtp_tls!r} is not starttls, implicit or none")
        default_port = {"starttls": "587", "implicit": "465", "none": "25"}[self.smtp_tls]
        self.smtp_port = int(env("SMTP_PORT", default_port))
        self.smtp_ca_file = env("SMTP_CA_FILE")
        self.smtp_user = env("SMTP_USER")
        self.smtp_password = env("SMTP_PASSWORD")
        if self.smtp_user and self.smtp_tls == "none":
            raise SystemExit(
                "SMTP_USER is set but SMTP_TLS=none: the dispatcher never logs in over an "
                "unencrypted connection (anyone on the path would read the password and every "
                "link); set SMTP_TLS=starttls or implicit"
            )
        self.tls_context = None
        if self.smtp_tls != "none":
            # Verifies the certificate chain and the host name; a private CA
            # replaces the system's with SMTP_CA_FILE.
            try:
                self.tls_context = ssl.create_default_context(cafile=self.smtp_ca_file)
            except (OSError, ssl.SSLError) as e:
                raise SystemExit(f"SMTP_CA_FILE: {self.smtp_ca_file}: {e}")
        self.smtp_timeout = float(env("SMTP_TIMEOUT_SECS", "10"))
        self.max_attempts = int(env("SMTP_MAX_ATTEMPTS", "20"))
        self.retry_min = int(env("RETRY_MIN_MS", "1000")) / 1000
        self.retry_max = int(env("RETRY_MAX_MS", "60000")) / 1000
        self.mail_from = env("MAIL_FROM")
        if not self.mail_from:
            raise SystemExit("MAIL_FROM: the sender address is required")
        self.subjects = {
            "verify-account": env("SUBJECT_VERIFY_ACCOUNT", "Verify your account"),
            "reset-password": env("SUBJECT_RESET_PASSWORD", "Reset your password"),
        }
        self.templates_dir = env("TEMPLATES_DIR", str(Path(__file__).with_name("templates")))
        self.dedupe_db = env("DEDUPE_DB", "dispatcher-sent.sqlite3")
        self.retention_days = float(env("DEDUPE_RETENTION_DAYS", "7"))
        self.metrics_addr = env("METRICS_ADDR", "127.0.0.1:9465")


class Metrics:
    """Counters, served as Prometheus text on /metrics."""

    def __init__(self):
        self.lock = threading.Lock()
        self.sent = 0
        self.retried = 0
        self.duplicates = 0
        self.dead_lettered = {}

    def add(self, name, code=None):
        with self.lock:
            if name == "dead_lettered":
                self.dead_lettered[code] = self.dead_lettered.get(code, 0) + 1
            else:
                setattr(self, name, getattr(self, name) + 1)

    def text(self):
        with self.lock:
            lines = [
                "# HELP profile_email_dispatcher_sent_total Emails the SMTP server accepted.",
                "# TYPE profile_email_dispatcher_sent_total counter",
                f"profile_email_dispatcher_sent_total {self.sent}",
                "# HELP profile_email_dispatcher_retried_total Sending attempts that failed and were retried.",
                "# TYPE profile_email_dispatcher_retried_total counter",
                f"profile_email_dispatcher_retried_total {self.retried}",
                "# HELP profile_email_dispatcher_duplicates_total Redelivered events already sent, acked without sending.",
                "# TYPE profile_email_dispatcher_duplicates_total counter",
                f"profile_email_dispatcher_duplicates_total {self.duplicates}",
                "# HELP profile_email_dispatcher_dead_lettered_total Events dead-lettered, by code.",
                "# TYPE profile_email_dispatcher_dead_lettered_total counter",
            ]
            for code, n in sorted(self.dead_lettered.items()):
                lines.append(f'profile_email_dispatcher_dead_lettered_total{{code="{code}"}} {n}')
            return "\n".join(lines) + "\n"


def serve_metrics(metrics, addr):
    host, port = addr.rsplit(":", 1)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/metrics":
                self.send_error(404)
                return
            body = metrics.text().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((host, int(port)), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    log.info("serving /metrics on %s:%d", host, server.server_address[1])


class Claims:
    """The dispatcher's own table: which events it has started and finished sending."""

    def __init__(self, path, retention_days):
        self.db = sqlite3.connect(path)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS claims ("
            " message_id TEXT PRIMARY KEY,"
            " state TEXT NOT NULL CHECK (state IN ('sending', 'sent')),"
            " at REAL NOT NULL)"
        )
        self.db.execute("DELETE FROM claims WHERE at < ?", (time.time() - retention_days * 86400,))
        self.db.commit()

    def state(self, message_id):
        row = self.db.execute("SELECT state FROM claims WHERE message_id = ?", (message_id,)).fetchone()
        return row[0] if row else None

    def claim(self, message_id):
        self.db.execute("INSERT INTO claims VALUES (?, 'sending', ?)", (message_id, time.time()))
        self.db.commit()

    def sent(self, message_id):
        self.db.execute("UPDATE claims SET state = 'sent', at = ? WHERE message_id = ?", (time.time(), message_id))
        self.db.commit()

    def release(self, message_id):
        """Nothing was handed to the SMTP server: the event may be sent later."""
        self.db.execute("DELETE FROM claims WHERE message_id = ? AND state = 'sending'", (message_id,))
        self.db.commit()


class NotSent(Exception):
    """The SMTP server took nothing: safe to retry (transient) or to dead-letter (permanent)."""

    def __init__(self, reason, permanent):
        super().__init__(reason)
        self.permanent = permanent


class MaybeSent(Exception):
    """The connection broke after the message was handed over: it may have been accepted."""


def send(settings, message, to, before_handing_over):
    """Sends `message` to `to` alone; raises NotSent or MaybeSent.
    `before_handing_over()` runs once the session is ready, right before the
    message goes to the server."""
    where = f"{settings.smtp_host}:{settings.smtp_port}"
    try:
        if settings.smtp_tls == "implicit":
            smtp = smtplib.SMTP_SSL(settings.smtp_host, settings.smtp_port,
                                    timeout=settings.smtp_timeout, context=settings.tls_context)
        else:
            smtp = smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=settings.smtp_timeout)
    except ssl.SSLCertVerificationError as e:
        raise NotSent(f"TLS to {where}: the server's certificate was not accepted: {e.verify_message}",
                      permanent=False)
    except (OSError, smtplib.SMTPException) as e:
        raise NotSent(f"cannot reach {where}: {e}", permanent=False)
    try:
        try:
            if settings.smtp_tls == "starttls":
                smtp.starttls(context=settings.tls_context)
            if settings.smtp_user:
                # Only ever over TLS: Settings refuses SMTP_USER without it.
                smtp.login(settings.smtp_user, settings.smtp_password or "")
        except ssl.SSLCertVerificationError as e:
            raise NotSent(f"STARTTLS to {where}: the server's certificate was not accepted: "
                          f"{e.verify_message}", permanent=False)
        except smtplib.SMTPNotSupportedError as e:
            raise NotSent(f"{where} does not offer STARTTLS (SMTP_TLS=starttls): {e}", permanent=False)
        except smtplib.SMTPAuthenticationError as e:
            raise NotSent(f"SMTP login refused: {e.smtp_code} {e.smtp_error!r}", permanent=False)
        except (OSError, smtplib.SMTPException) as e:
            raise NotSent(f"SMTP session failed before sending: {e}", permanent=False)
        before_handing_over()
        try:
            # The recipient given explicitly: never taken from the headers.
            smtp.send_message(message, to_addrs=[to])
        except smtplib.SMTPRecipientsRefused as e:
            codes = [c for c, _ in e.recipients.values()]
            raise NotSent(f"SMTP refused the recipient: {e.recipients}", permanent=all(c >= 500 for c in codes))
        except (smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as e:
            raise NotSent(f"SMTP refused the message: {e.smtp_code} {e.smtp_error!r}", permanent=e.smtp_code >= 500)
        except smtplib.SMTPResponseException as e:
            raise NotSent(f"SMTP answered {e.smtp_code} {e.smtp_error!r}", permanent=e.smtp_code >= 500)
        except (OSError, smtplib.SMTPServerDisconnected) as e:
            raise MaybeSent(f"the SMTP connection broke while sending: {e}")
    finally:
        try:
            smtp.quit()
        except (OSError, smtplib.SMTPException):
            smtp.close()


class Dispatcher:
    def __init__(self, settings, metrics):
        self.settings = settings
        self.metrics = metrics
        self.claims = Claims(settings.dedupe_db, settings.retention_days)
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(settings.templates_dir),
            autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default=False),
            undefined=jinja2.StrictUndefined,
        )
        self.stopping = False
        self.channel = None
        self.connection = None

    # -- what to send ------------------------------------------------------

    def message_for(self, event):
        template = event["template"]
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}")
        if single_address(event["to"]) is None:
            raise ValueError("\"to\" is not one address (name@domain, without a display name or a list)")
        context = {
            "link": event["verificationLink"],
            "to": event["to"],
            "tenant": event["tenant"],
            "profile_id": event["profileId"],
        }
        message = email.message.EmailMessage()
        message["From"] = self.settings.mail_from
        message["To"] = event["to"]
        message["Subject"] = self.settings.subjects[template]
        message["Date"] = email.utils.formatdate(localtime=False)
        message["Message-ID"] = email.utils.make_msgid(domain="profile-email-dispatcher")
        message.set_content(self.templates.get_template(f"{template}.txt").render(context))
        message.add_alternative(self.templates.get_template(f"{template}.html").render(context), subtype="html")
        return message

    # -- one delivery ------------------------------------------------------

    def handle(self, channel, method, properties, body):
        key = properties.message_id
        try:
            event = json.loads(body)
            if not isinstance(event, dict):
                raise ValueError("the body is not a JSON object")
            missing = [f for f in REQUIRED_FIELDS if not isinstance(event.get(f), str) or not event.get(f)]
            if missing:
                raise ValueError(f"missing fields: {', '.join(missing)}")
            key = key or event.get("id")
            if not key:
                raise ValueError("no message_id and no id: nothing to dedupe on")
            message = self.message_for(event)
        except (ValueError, jinja2.TemplateError) as e:
            return self.dead_letter(method, properties, body, "MALFORMED_EVENT", str(e))

        state = self.claims.state(key)
        if state == "sent":
            log.info("event %s was sent before; acking the redelivery", key)
            self.metrics.add("duplicates")
            return channel.basic_ack(method.delivery_tag)
        if state == "sending":
            return self.dead_letter(
                method, properties, body, "INTERRUPTED_WHILE_SENDING",
                "an earlier attempt was interrupted after handing the message to the SMTP server; "
                "not sent again, so that no address gets it twice (look at the inbox, then replay or drop it)",
            )

        delay = self.settings.retry_min
        for attempt in range(1, self.settings.max_attempts + 1):
            try:
                send(self.settings, message, event["to"], lambda: self.claims.claim(key))
            except NotSent as e:
                self.claims.release(key)
                if e.permanent:
                    return self.dead_letter(method, properties, body, "SMTP_REFUSED", str(e))
                if attempt == self.settings.max_attempts:
                    return self.dead_letter(
                        method, properties, body, "SMTP_UNAVAILABLE",
                        f"gave up after {attempt} attempts: {e}",
                    )
                self.metrics.add("retried")
                pause = min(delay, self.settings.retry_max) * (1 + random.random())
                log.warning("event %s not sent (%s); attempt %d of %d, next in %.1f s",
                            key, e, attempt, self.settings.max_attempts, pause)
                delay *= 2
                # Sleeping through the connection keeps its heartbeats going.
                self.connection.sleep(pause)
                if self.stopping:
                    # Unacked: it goes back to the queue for the next dispatcher.
                    return None
                continue
            except MaybeSent as e:
                return self.dead_letter(method, properties, body, "INTERRUPTED_WHILE_SENDING", str(e))
            self.claims.sent(key)
            self.metrics.add("sent")
            log.info("event %s sent to %s (%s)", key, event["to"], event["template"])
            return channel.basic_ack(method.delivery_tag)

    def dead_letter(self, method, properties, body, code, reason):
        """To the dispatch queue's dead-letter exchange, with why; then acked."""
        headers = dict(properties.headers or {})
        headers["x-error-code"] = code
        headers["x-error-reason"] = reason
        copy = pika.BasicProperties(
            content_type=properties.content_type,
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=properties.message_id,
            type=properties.type,
            timestamp=properties.timestamp,
            headers=headers,
        )
        # Confirmed (confirm_delivery), so the ack below never loses the event.
        self.channel.basic_publish(self.settings.dead_letter_exchange, method.routing_key, body, copy, mandatory=False)
        self.metrics.add("dead_lettered", code)
        log.error("event %s dead-lettered (%s): %s", properties.message_id, code, reason)
        self.channel.basic_ack(method.delivery_tag)

    # -- the connection ----------------------------------------------------

    def run(self):
        params = pika.URLParameters(self.settings.amqp_url)
        backoff = 1.0
        while not self.stopping:
            try:
                self.connection = pika.BlockingConnection(params)
                self.channel = self.connection.channel()
                self.channel.confirm_delivery()
                # One at a time: the next event waits while this one retries.
                self.channel.basic_qos(prefetch_count=1)
                self.channel.basic_consume(self.settings.queue, self.handle)
                log.info("consuming %s", self.settings.queue)
                backoff = 1.0
                while not self.stopping:
                    self.connection.process_data_events(time_limit=1)
                self.connection.close()
            except pika.exceptions.AMQPError as e:
                if self.stopping:
                    break
                pause = backoff * (1 + random.random())
                log.warning("broker connection lost (%r); reconnecting in %.1f s", e, pause)
                time.sleep(pause)
                backoff = min(backoff * 2, 30)


def main():
    logging.basicConfig(level=env("LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if sys.argv[1:2] == ["forget"]:
        # Before replaying an INTERRUPTED_WHILE_SENDING dead letter whose email
        # did not arrive: forget its claim, so the replay is sent.
        claims = Claims(env("DEDUPE_DB", "dispatcher-sent.sqlite3"), float(env("DEDUPE_RETENTION_DAYS", "7")))
        for message_id in sys.argv[2:]:
            claims.db.execute("DELETE FROM claims WHERE message_id = ?", (message_id,))
            print(f"forgot {message_id}")
        claims.db.commit()
        return 0
    settings = Settings()
    metrics = Metrics()
    if settings.metrics_addr != "off":
        serve_metrics(metrics, settings.metrics_addr)
    log.info("SMTP: %s:%d, TLS %s%s", settings.smtp_host, settings.smtp_port, settings.smtp_tls,
             ", logging in" if settings.smtp_user else "")
    dispatcher = Dispatcher(settings, metrics)

    def stop(signum, frame):
        log.info("signal %d: finishing the current event, then stopping", signum)
        dispatcher.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    dispatcher.run()
    log.info("stopped")


if __name__ == "__main__":
    sys.exit(main())
