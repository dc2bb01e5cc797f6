-- The W3C tracestate that goes with an event's traceparent (vendor trace data a
-- publisher sent), so an event re-published later carries it too.
ALTER TABLE outbox ADD COLUMN tracestate text;
