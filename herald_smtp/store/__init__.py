"""The idempotency stores: base.py says what each promises; opener.py opens the one configured."""
