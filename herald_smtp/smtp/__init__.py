"""The SMTP side: relay choice, session, transaction, message building."""
