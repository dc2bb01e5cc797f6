"""A reference email dispatcher for profile-worker's `email.requested` events.

It reads the dispatch queue (`profile.email.dispatch`) as the dispatcher's
broker user, renders the event's template (`verify-account` or
`reset-password`, text and HTML, the tenant's and the locale's when there are
some), sends it through one SMTP session it keeps open, and acks the event
only once the SMTP server has accepted the message.

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
whose email never arrived). Settings: the class `Settings` below, one
environment variable per field (README.md lists them).
"""

import email.message
import email.utils
import ipaddress
import json
import logging
import re
import signal
import smtplib
import sqlite3
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal, Optional

import jinja2
import pika
import prometheus_client
import tenacity
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from pydantic import SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pythonjsonlogger.json import JsonFormatter

log = logging.getLogger("dispatcher")

TEMPLATES = ("verify-account", "reset-password")
REQUIRED_FIELDS = ("to", "template", "verificationLink", "tokenId", "profileId", "tenant")
# A locale as the worker passes it on (BCP 47's shape), and a tenant name fit
# to be a folder: anything else is not looked up (no path is built from it).
LOCALE = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$")
FOLDER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def is_loopback(host):
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Every setting, from the environment (empty counts as unset)."""

    model_config = SettingsConfigDict(case_sensitive=True, env_ignore_empty=True, extra="ignore")

    # The dispatcher's broker user, the queue and its dead-letter exchange.
    AMQP_URL: SecretStr = SecretStr("amqp://profile-email-dispatcher:profile-email-dispatcher@127.0.0.1:5672/%2f")
    EMAIL_QUEUE: str = "profile.email.dispatch"
    EMAIL_DEAD_LETTER_EXCHANGE: str = "profile.email.dlx"
    # SMTP: starttls (the default off loopback), implicit (port 465) or none
    # (the default on loopback); the certificate and host name are always
    # verified, against SMTP_CA_FILE when given. SMTP_STARTTLS=1 is the older
    # spelling of starttls. No login without TLS.
    SMTP_HOST: str = "127.0.0.1"
    SMTP_PORT: Optional[int] = None
    SMTP_TLS: Optional[Literal["starttls", "implicit", "none"]] = None
    SMTP_STARTTLS: bool = False
    SMTP_CA_FILE: Optional[str] = None
    SMTP_USER: Optional[str] = None
    SMTP_PASSWORD: Optional[SecretStr] = None
    SMTP_TIMEOUT_SECS: float = 10
    SMTP_MAX_ATTEMPTS: int = 20
    RETRY_MIN_MS: int = 1000
    RETRY_MAX_MS: int = 60000
    # The email: sender, default subjects, templates (<dir>/[<tenant>/][<locale>/]<template>.txt|.html).
    MAIL_FROM: str
    SUBJECT_VERIFY_ACCOUNT: str = "Verify your account"
    SUBJECT_RESET_PASSWORD: str = "Reset your password"
    TEMPLATES_DIR: str = str(Path(__file__).with_name("templates"))
    # The claims (at most one email per event) and how long they are kept.
    DEDUPE_DB: str = "dispatcher-sent.sqlite3"
    DEDUPE_RETENTION_DAYS: float = 7
    # /metrics, /healthz, /readyz ("off": none), and the log level.
    METRICS_ADDR: str = "127.0.0.1:9465"
    LOG_LEVEL: str = "INFO"

    @model_validator(mode="after")
    def _tls(self):
        if self.SMTP_TLS is None:
            self.SMTP_TLS = "starttls" if self.SMTP_STARTTLS or not is_loopback(self.SMTP_HOST) else "none"
        if self.SMTP_PORT is None:
            self.SMTP_PORT = {"starttls": 587, "implicit": 465, "none": 25}[self.SMTP_TLS]
        if self.SMTP_USER and self.SMTP_TLS == "none":
            raise ValueError(
                "SMTP_USER is set but SMTP_TLS=none: the dispatcher never logs in over an unencrypted "
                "connection (anyone on the path would read the password and every link); set "
                "SMTP_TLS=starttls or implicit"
            )
        return self

    def tls_context(self):
        """Verifies the chain and the host name; a private CA replaces the system's."""
        if self.SMTP_TLS == "none":
            return None
        return ssl.create_default_context(cafile=self.SMTP_CA_FILE)


def load_settings():
    try:
        settings = Settings()
        settings.tls_context()  # a CA file that cannot be read stops it here
        return settings
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}" for err in e.errors())
        raise SystemExit(problems)
    except (OSError, ssl.SSLError) as e:
        raise SystemExit(f"SMTP_CA_FILE: {e}")


def mask(address):
    """An address as the logs may show it: its first letter and its domain."""
    local, at, domain = str(address).partition("@")
    return f"{local[:1]}***@{domain}" if at else "***"


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
    if email.utils.getaddresses([to]) != [("", to)]:
        return None
    return to


class Metrics:
    """The dispatcher's counters, served as Prometheus text on /metrics."""

    def __init__(self):
        self.registry = prometheus_client.CollectorRegistry()
        r = self.registry
        self.sent = prometheus_client.Counter(
            "profile_email_dispatcher_sent", "Emails the SMTP server accepted.", registry=r)
        self.retried = prometheus_client.Counter(
            "profile_email_dispatcher_retried", "Sending attempts that failed and were retried.", registry=r)
        self.duplicates = prometheus_client.Counter(
            "profile_email_dispatcher_duplicates",
            "Redelivered events already sent, acked without sending.", registry=r)
        self.dead_lettered = prometheus_client.Counter(
            "profile_email_dispatcher_dead_lettered", "Events dead-lettered, by code.", ["code"], registry=r)
        self.smtp_sessions = prometheus_client.Counter(
            "profile_email_dispatcher_smtp_sessions", "SMTP sessions opened (one is kept across emails).",
            registry=r)
        self.consuming = prometheus_client.Gauge(
            "profile_email_dispatcher_consuming", "1 while the dispatcher consumes its queue.", registry=r)
        # What /readyz answers: set while consuming.
        self.ready = threading.Event()

    def set_consuming(self, on):
        self.consuming.set(1 if on else 0)
        (self.ready.set if on else self.ready.clear)()


def serve_http(metrics, addr):
    """/metrics, /healthz (the process answers) and /readyz (it consumes its queue)."""
    host, port = addr.rsplit(":", 1)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/metrics":
                body, kind, status = prometheus_client.generate_latest(metrics.registry), \
                    prometheus_client.CONTENT_TYPE_LATEST, 200
            elif self.path == "/healthz":
                body, kind, status = b"ok\n", "text/plain", 200
            elif self.path == "/readyz":
                ready = metrics.ready.is_set()
                body = b"ready\n" if ready else b"not consuming (connecting to the broker)\n"
                kind, status = "text/plain", 200 if ready else 503
            else:
                self.send_error(404)
                return
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((host, int(port)), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    log.info("serving /metrics, /healthz and /readyz", extra={"addr": f"{host}:{server.server_address[1]}"})


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


class Smtp:
    """One SMTP session, kept across emails: opened (TLS, login) on first use,
    checked with NOOP before each message, and opened again when it dropped."""

    def __init__(self, settings, metrics):
        self.settings = settings
        self.metrics = metrics
        self.context = settings.tls_context()
        self.session = None

    def _open(self):
        s = self.settings
        where = f"{s.SMTP_HOST}:{s.SMTP_PORT}"
        try:
            if s.SMTP_TLS == "implicit":
                smtp = smtplib.SMTP_SSL(s.SMTP_HOST, s.SMTP_PORT, timeout=s.SMTP_TIMEOUT_SECS, context=self.context)
            else:
                smtp = smtplib.SMTP(s.SMTP_HOST, s.SMTP_PORT, timeout=s.SMTP_TIMEOUT_SECS)
        except ssl.SSLCertVerificationError as e:
            raise NotSent(f"TLS to {where}: the server's certificate was not accepted: {e.verify_message}",
                          permanent=False)
        except (OSError, smtplib.SMTPException) as e:
            raise NotSent(f"cannot reach {where}: {e}", permanent=False)
        try:
            if s.SMTP_TLS == "starttls":
                smtp.starttls(context=self.context)
            if s.SMTP_USER:
                # Only ever over TLS: Settings refuses SMTP_USER without it.
                smtp.login(s.SMTP_USER, s.SMTP_PASSWORD.get_secret_value() if s.SMTP_PASSWORD else "")
        except ssl.SSLCertVerificationError as e:
            smtp.close()
            raise NotSent(f"STARTTLS to {where}: the server's certificate was not accepted: {e.verify_message}",
                          permanent=False)
        except smtplib.SMTPNotSupportedError as e:
            smtp.close()
            raise NotSent(f"{where} does not offer STARTTLS (SMTP_TLS=starttls): {e}", permanent=False)
        except smtplib.SMTPAuthenticationError as e:
            smtp.close()
            raise NotSent(f"SMTP login refused: {e.smtp_code} {e.smtp_error!r}", permanent=False)
        except (OSError, smtplib.SMTPException) as e:
            smtp.close()
            raise NotSent(f"SMTP session failed before sending: {e}", permanent=False)
        self.metrics.smtp_sessions.inc()
        log.info("SMTP session opened", extra={"smtp": where, "tls": s.SMTP_TLS})
        return smtp

    def _ready(self):
        """The open session if it still answers, else a new one."""
        if self.session is not None:
            try:
                if self.session.noop()[0] == 250:
                    return self.session
            except (OSError, smtplib.SMTPException):
                pass
            self.close()
        self.session = self._open()
        return self.session

    def send(self, message, to, before_handing_over):
        """Sends `message` to `to` alone; raises NotSent or MaybeSent.
        `before_handing_over()` runs right before the message goes to the server."""
        smtp = self._ready()
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
            self.close()
            raise MaybeSent(f"the SMTP connection broke while sending: {e}")

    def close(self):
        if self.session is not None:
            try:
                self.session.quit()
            except (OSError, smtplib.SMTPException):
                self.session.close()
            self.session = None


class Templates:
    """The emails' templates, looked up for the event's tenant and locale
    first: <dir>/<tenant>/<locale>/, <dir>/<tenant>/, <dir>/<locale>/, then
    <dir>/, and the locale without its region (fr-CA, then fr)."""

    def __init__(self, directory):
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(directory),
            autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default=False),
            undefined=jinja2.StrictUndefined,
        )

    @staticmethod
    def folders(tenant, locale):
        tenants = [tenant] if isinstance(tenant, str) and FOLDER.match(tenant) and ".." not in tenant else []
        locales = []
        if isinstance(locale, str) and LOCALE.match(locale):
            parts = locale.split("-")
            locales = ["-".join(parts[:n]) for n in range(len(parts), 0, -1)]
        out = [f"{t}/{l}/" for t in tenants for l in locales] + [f"{t}/" for t in tenants]
        return out + [f"{l}/" for l in locales] + [""]

    def find(self, name, tenant, locale):
        """The first template named `name` along the lookup, or None."""
        for folder in self.folders(tenant, locale):
            try:
                return self.env.get_template(folder + name)
            except jinja2.TemplateNotFound:
                continue
        return None


class Dispatcher:
    def __init__(self, settings, metrics):
        self.settings = settings
        self.metrics = metrics
        self.claims = Claims(settings.DEDUPE_DB, settings.DEDUPE_RETENTION_DAYS)
        self.templates = Templates(settings.TEMPLATES_DIR)
        self.smtp = Smtp(settings, metrics)
        self.tracer = trace.get_tracer("profile-email-dispatcher")
        self.stopping = False
        self.stop_event = threading.Event()
        self.channel = None
        self.connection = None

    # -- what to send ------------------------------------------------------

    def message_for(self, event):
        template = event["template"]
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}")
        if single_address(event["to"]) is None:
            raise ValueError("\"to\" is not one address (name@domain, without a display name or a list)")
        tenant, locale = event["tenant"], event.get("locale")
        context = {
            "link": event["verificationLink"],
            "to": event["to"],
            "tenant": tenant,
            "profile_id": event["profileId"],
            "locale": locale,
        }
        text, html = (self.templates.find(f"{template}.{kind}", tenant, locale) for kind in ("txt", "html"))
        if text is None or html is None:
            raise ValueError(f"no template {template} in {self.settings.TEMPLATES_DIR}")
        subject_file = self.templates.find(f"{template}.subject", tenant, locale)
        default_subject = {
            "verify-account": self.settings.SUBJECT_VERIFY_ACCOUNT,
            "reset-password": self.settings.SUBJECT_RESET_PASSWORD,
        }[template]
        subject = subject_file.render(context).strip() if subject_file else default_subject
        message = email.message.EmailMessage()
        message["From"] = self.settings.MAIL_FROM
        message["To"] = event["to"]
        message["Subject"] = subject
        message["Date"] = email.utils.formatdate(localtime=False)
        message["Message-ID"] = email.utils.make_msgid(domain="profile-email-dispatcher")
        message.set_content(text.render(context))
        message.add_alternative(html.render(context), subtype="html")
        # After the parts: setting the content clears Content-* headers.
        if isinstance(locale, str) and LOCALE.match(locale):
            message["Content-Language"] = locale
        return message

    # -- one delivery ------------------------------------------------------

    def handle(self, channel, method, properties, body):
        headers = properties.headers or {}
        # The worker's span for the command that asked for this email is the
        # parent of the sending: one trace from the caller to the inbox.
        parent = propagate.extract({k: v for k, v in headers.items() if isinstance(v, str)})
        with self.tracer.start_as_current_span("smtp send", context=parent, kind=trace.SpanKind.CLIENT) as span:
            span.set_attribute("messaging.message.id", str(properties.message_id or ""))
            self._handle(channel, method, properties, body, span)

    def _handle(self, channel, method, properties, body, span):
        key = properties.message_id
        ctx = span.get_span_context()
        ids = {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}
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
            return self.dead_letter(method, properties, body, "MALFORMED_EVENT", str(e), ids)
        ids["event"] = key
        ids["to"] = mask(event["to"])
        state = self.claims.state(key)
        if state == "sent":
            log.info("sent before; acking the redelivery", extra=ids)
            self.metrics.duplicates.inc()
            return channel.basic_ack(method.delivery_tag)
        if state == "sending":
            return self.dead_letter(
                method, properties, body, "INTERRUPTED_WHILE_SENDING",
                "an earlier attempt was interrupted after handing the message to the SMTP server; "
                "not sent again, so that no address gets it twice (look at the inbox, then replay or drop it)",
                ids,
            )
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.settings.SMTP_MAX_ATTEMPTS) | tenacity.stop_when_event_set(self.stop_event),
            wait=tenacity.wait_random_exponential(
                multiplier=self.settings.RETRY_MIN_MS / 1000, max=self.settings.RETRY_MAX_MS / 1000),
            retry=tenacity.retry_if_exception(lambda e: isinstance(e, NotSent) and not e.permanent),
            # Sleeping through the connection keeps its heartbeats going.
            sleep=self.connection.sleep,
            before_sleep=lambda rs: self._retrying(rs, ids),
            reraise=True,
        )
        try:
            retrying(self.smtp.send, message, event["to"], lambda: self.claims.claim(key))
        except NotSent as e:
            self.claims.release(key)
            if self.stopping and not e.permanent:
                # Unacked: it goes back to the queue for the next dispatcher.
                return None
            code = "SMTP_REFUSED" if e.permanent else "SMTP_UNAVAILABLE"
            reason = str(e) if e.permanent else f"gave up after {self.settings.SMTP_MAX_ATTEMPTS} attempts: {e}"
            return self.dead_letter(method, properties, body, code, reason, ids)
        except MaybeSent as e:
            return self.dead_letter(method, properties, body, "INTERRUPTED_WHILE_SENDING", str(e), ids)
        self.claims.sent(key)
        self.metrics.sent.inc()
        log.info("sent", extra={**ids, "template": event["template"], "locale": event.get("locale")})
        return channel.basic_ack(method.delivery_tag)

    def _retrying(self, state, ids):
        self.claims.release(ids["event"])
        self.metrics.retried.inc()
        log.warning(
            "not sent; retrying",
            extra={**ids, "error": str(state.outcome.exception()), "attempt": state.attempt_number,
                   "next_in_secs": round(state.next_action.sleep, 2)},
        )

    def dead_letter(self, method, properties, body, code, reason, ids):
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
        self.channel.basic_publish(self.settings.EMAIL_DEAD_LETTER_EXCHANGE, method.routing_key, body, copy,
                                   mandatory=False)
        self.metrics.dead_lettered.labels(code).inc()
        log.error("dead-lettered", extra={**ids, "code": code, "reason": reason})
        self.channel.basic_ack(method.delivery_tag)

    # -- the connection ----------------------------------------------------

    def run(self):
        try:
            self._reconnecting()
        except tenacity.RetryError:
            if not self.stopping:
                raise

    def _reconnecting(self):
        params = pika.URLParameters(self.settings.AMQP_URL.get_secret_value())
        for attempt in tenacity.Retrying(
            wait=tenacity.wait_random_exponential(multiplier=1, max=30),
            retry=tenacity.retry_if_exception_type(pika.exceptions.AMQPError),
            stop=tenacity.stop_when_event_set(self.stop_event),
            before_sleep=lambda rs: log.warning(
                "broker connection lost; reconnecting",
                extra={"error": repr(rs.outcome.exception()), "next_in_secs": round(rs.next_action.sleep, 2)}),
        ):
            with attempt:
                self._consume(params)

    def _consume(self, params):
        try:
            self.connection = pika.BlockingConnection(params)
            self.channel = self.connection.channel()
            self.channel.confirm_delivery()
            # One at a time: the next event waits while this one retries.
            self.channel.basic_qos(prefetch_count=1)
            self.channel.basic_consume(self.settings.EMAIL_QUEUE, self.handle)
            self.metrics.set_consuming(True)
            log.info("consuming", extra={"queue": self.settings.EMAIL_QUEUE})
            while not self.stopping:
                self.connection.process_data_events(time_limit=1)
            self.connection.close()
        finally:
            self.metrics.set_consuming(False)


def setup_logging(level):
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(
        "{asctime}{levelname}{name}{message}", style="{",
        rename_fields={"asctime": "ts", "levelname": "level", "name": "logger"}))
    logging.basicConfig(level=level, handlers=[handler])


def setup_tracing():
    """Spans go where the standard OTEL_* variables say (OTLP over HTTP); with
    none set, they are made (for the logs' trace_id) and not exported."""
    import os
    provider = TracerProvider(resource=Resource.create({"service.name": "profile-email-dispatcher"}))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def main():
    if sys.argv[1:2] == ["forget"]:
        # Before replaying an INTERRUPTED_WHILE_SENDING dead letter whose email
        # did not arrive: forget its claim, so the replay is sent.
        import os
        claims = Claims(os.environ.get("DEDUPE_DB") or "dispatcher-sent.sqlite3",
                        float(os.environ.get("DEDUPE_RETENTION_DAYS") or "7"))
        for message_id in sys.argv[2:]:
            claims.db.execute("DELETE FROM claims WHERE message_id = ?", (message_id,))
            print(f"forgot {message_id}")
        claims.db.commit()
        return 0
    settings = load_settings()
    setup_logging(settings.LOG_LEVEL)
    provider = setup_tracing()
    metrics = Metrics()
    if settings.METRICS_ADDR != "off":
        serve_http(metrics, settings.METRICS_ADDR)
    log.info(f"SMTP: {settings.SMTP_HOST}:{settings.SMTP_PORT}, TLS {settings.SMTP_TLS}"
             + (", logging in" if settings.SMTP_USER else ""))
    dispatcher = Dispatcher(settings, metrics)

    def stop(signum, _frame):
        log.info("signal %d: finishing the current event, then stopping", signum)
        dispatcher.stopping = True
        dispatcher.stop_event.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    dispatcher.run()
    dispatcher.smtp.close()
    provider.shutdown()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
