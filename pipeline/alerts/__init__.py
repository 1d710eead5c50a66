"""Alert consumers: incident lifecycle (open -> updated -> resolved), the alerts-topic outbox relay,
operator feedback (ack, true/false-positive labels) and the `pipeline alerts` commands."""
