-- The W3C traceparent an event is published with, so an event re-published by the
-- relay or on a redelivery stays in the trace of the command that caused it.
ALTER TABLE outbox ADD COLUMN traceparent text;
