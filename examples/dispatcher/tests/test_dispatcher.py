"""What the dispatcher does beyond one email per event (tests/integration/
dispatcher.rs in the project covers that, with a real worker): templates per
tenant and locale, one SMTP session reused, structured logs that name no
recipient, the event's trace continued, and its health endpoints."""

import email
import email.policy
import shutil
from pathlib import Path

from conftest import Smtp, event, wait_until


def read(raw):
    """(subject, text part, the message) of a stored email, decoded."""
    m = email.message_from_string(raw, policy=email.policy.default)
    return str(m["Subject"]), m.get_body(("plain",)).get_content(), m


def test_health_and_metrics_endpoints(start):
    d = start()
    assert d.get("/healthz") == (200, "ok\n")
    assert d.get("/readyz")[0] == 200
    assert d.metric("profile_email_dispatcher_consuming") == 1.0
    assert "profile_email_dispatcher_sent_total" in d.get("/metrics")[1]
    assert d.get("/nope")[0] == 404


def test_templates_are_looked_up_per_tenant_and_locale_then_fall_back(broker, smtp, start, tmp_path):
    templates = tmp_path / "templates"
    shutil.copytree(Path(__file__).parent.parent / "templates", templates)
    (templates / "acme").mkdir()
    (templates / "acme" / "verify-account.txt").write_text("ACME verify: {{ link }}\n")
    (templates / "acme" / "verify-account.html").write_text("<p>ACME <a href=\"{{ link }}\">verify</a></p>\n")
    (templates / "acme" / "verify-account.subject").write_text("ACME: confirm your address\n")
    (templates / "fr").mkdir()
    (templates / "fr" / "verify-account.txt").write_text("Vérifiez votre compte : {{ link }}\n")
    (templates / "fr" / "verify-account.html").write_text("<p><a href=\"{{ link }}\">Vérifier</a></p>\n")
    (templates / "fr" / "verify-account.subject").write_text("Vérifiez votre compte\n")
    start(TEMPLATES_DIR=str(templates))
    cases = [
        (event(tenant="acme"), "ACME verify:", "ACME: confirm your address"),
        # The tenant's own wins over the locale's.
        (event(tenant="acme", locale="fr-CA"), "ACME verify:", "ACME: confirm your address"),
        # fr-CA falls back to fr.
        (event(tenant="other", locale="fr-CA"), "Vérifiez votre compte :", "Vérifiez votre compte"),
        (event(tenant="other"), "Please verify your account", "Verify your account"),
        # Neither a tenant nor a locale that is no folder name is looked up.
        (event(tenant="../acme", locale="../fr"), "Please verify your account", "Verify your account"),
    ]
    for e, _, _ in cases:
        broker.publish(e)
    mail = wait_until(lambda: len(smtp.mail()) >= len(cases) and smtp.mail(), what="five emails")
    for (e, body, subject), raw in zip(cases, mail):
        got_subject, text, _ = read(raw)
        assert e["tokenId"] in text, text
        assert body in text, text
        assert got_subject == subject
    assert read(mail[2])[2]["Content-Language"] == "fr-CA"


def test_one_smtp_session_serves_many_emails_and_a_dropped_one_is_reopened(broker, smtp, start, tmp_path):
    d = start()
    for _ in range(5):
        broker.publish(event())
    wait_until(lambda: len(smtp.mail()) == 5, what="five emails")
    assert d.metric("profile_email_dispatcher_smtp_sessions_total") == 1.0
    # The server goes away and comes back: the next email opens a new session.
    port = smtp.port
    smtp.stop()
    again = Smtp(smtp.inbox, port=port)
    try:
        broker.publish(event())
        wait_until(lambda: len(again.mail()) == 6, what="the sixth email")
        assert d.metric("profile_email_dispatcher_smtp_sessions_total") == 2.0
        assert d.metric("profile_email_dispatcher_sent_total") == 6.0
        assert d.metric("profile_email_dispatcher_dead_lettered_total") == 0.0
    finally:
        again.stop()
        smtp.proc = again.proc


def test_logs_are_json_and_name_no_recipient(broker, smtp, start):
    d = start()
    broker.publish(event(to="jane.doe@example.com"))
    broker.publish(event(to="one@example.com, two@example.net"))
    wait_until(lambda: len(smtp.mail()) == 1, what="the email")
    wait_until(lambda: any(l.get("message") == "dead-lettered" for l in d.lines()), what="the dead letter")
    assert [h["x-error-code"] for h, _ in broker.dead_letters()] == ["MALFORMED_EVENT"]
    lines = d.lines()
    assert lines and all(not l.get("not_json") for l in lines), lines
    text = d.log.read_text()
    for address in ("jane.doe@example.com", "one@example.com", "two@example.net"):
        assert address not in text, f"{address} in the log"
    sent = [l for l in lines if l.get("message") == "sent"]
    assert len(sent) == 1 and sent[0]["to"] == "j***@example.com", sent
    assert all({"ts", "level", "logger", "message"} <= l.keys() for l in lines)


def test_the_events_trace_continues_into_the_smtp_send(broker, smtp, start):
    d = start()
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    broker.publish(event(), traceparent=f"00-{trace_id}-00f067aa0ba902b7-01")
    wait_until(lambda: any(l.get("message") == "sent" for l in d.lines()), what="sent")
    sent = next(l for l in d.lines() if l.get("message") == "sent")
    assert sent["trace_id"] == trace_id
    assert sent["span_id"] != "00f067aa0ba902b7", "a span of its own, in the event's trace"
