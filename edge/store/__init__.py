"""The outbox: the one SQLite repository every daemon and tool goes through.

- :mod:`~edge.store.outbox`: the connection, its bounded transactions, the ``events``
  table (commit, the uplink's queue walk, marks, acknowledgements, the prune);
- :mod:`~edge.store.lock`: the cross-process write lock, waited on for a bounded time;
- :mod:`~edge.store.schema`: the migrations (plain ``sqlite3``) and the schema version;
- :mod:`~edge.store.event_ids`: event ids (UUIDv7) that carry their sequence number;
- :mod:`~edge.store.queue_stats`: counts and the oldest unsent row without a scan;
- :mod:`~edge.store.batches`: how bulk work keeps every transaction short;
- one module per other table: :mod:`~edge.store.alarm_tests`, :mod:`~edge.store.sms`,
  :mod:`~edge.store.latches`, :mod:`~edge.store.sessions`,
  :mod:`~edge.store.daemon_state`, :mod:`~edge.store.snapshots`;
- :mod:`~edge.store.reader`: a read-only view for the monthly report;
- :mod:`~edge.store.rows`: the rows callers read, as frozen dataclasses.
"""
