# Two commands: `make run` (the service plus a local mail catcher) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CAPTURE_PORT ?= 1025

.PHONY: run test load bench hostile install mtas clean

$(BIN)/activate: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $(BIN)/activate

install: $(BIN)/activate

# Exim and OpenSMTPD for the tests, from Debian's packages: downloaded and unpacked into
# .cache/mtas, never installed (tests/unpack-mtas says how). Once; without apt the tests skip.
mtas:
	@tests/unpack-mtas

# The service on :8084 under gunicorn, sending to a capture server on 127.0.0.1:$(CAPTURE_PORT)
# that prints every mail it receives to this terminal. Values from .env are overridden here.
# Both run in the background of one shell, which waits for gunicorn: Ctrl-C reaches gunicorn
# from the terminal (a background job of sh ignores it, so the catcher is stopped by name), and
# a TERM to make reaches gunicorn through the trap. Not `kill 0`: that signals make and this
# shell too, whose trap then fires again for its own signal until the shell overflows its stack
# ("Segmentation fault").
run: install
	@echo "mail catcher on 127.0.0.1:$(CAPTURE_PORT); mail appears below. Ctrl-C stops both."
	@$(BIN)/python -m aiosmtpd -n -l 127.0.0.1:$(CAPTURE_PORT) & catcher=$$!; \
	SMTP_HOST=127.0.0.1 SMTP_PORT=$(CAPTURE_PORT) SMTP_USE_STARTTLS=false SMTP_USE_TLS=false \
	SMTP_USER= SMTP_PASSWORD= SMTP_FROM=$${SMTP_FROM:-noreply@example.com} \
	$(BIN)/gunicorn -c gunicorn.conf.py app:app & server=$$!; \
	trap 'kill $$server 2>/dev/null' INT TERM; \
	while kill -0 $$server 2>/dev/null; do wait $$server; status=$$?; done; \
	kill $$catcher 2>/dev/null; exit $$status

# Four test processes (most of the suite waits on servers and deadlines), then the tests marked
# `serial` (they measure timing or balance, and need the machine to themselves), one at a time.
# Exit status 5 is "no test selected", when PYTEST_ARGS picks none of one kind.
test: install mtas
	$(BIN)/python -m pytest -q -n 4 --dist loadfile -m "not serial" $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(BIN)/python -m pytest -q -m serial $(PYTEST_ARGS) || [ $$? -eq 5 ]

# The full load run: 20000 requests at 32 clients through gunicorn, steady then with chaos
# (SMTP restarts, a SIGKILLed worker); prints the figures. `make test` runs it at 2000.
LOAD_REQUESTS ?= 20000
LOAD_CLIENTS ?= 32
load: install
	HERALD_LOAD_REQUESTS=$(LOAD_REQUESTS) HERALD_LOAD_CLIENTS=$(LOAD_CLIENTS) \
	$(BIN)/python -m pytest -q -s -p no:logging tests/test_load.py $(PYTEST_ARGS)

# herald-smtp against the apps a Flask user would write instead (Flask-Mail, and smtplib by hand),
# side by side: through a private Postfix with STARTTLS and AUTH behind a 10 ms-per-reply proxy, then
# on loopback (about 10 minutes; not a test). Needs wrk, Postfix and sasl2-bin, and root for the
# private Postfix: as root it installs them with apt-get when missing, otherwise it prints the
# command to run (and, without root, skips the Postfix table). Options: BENCH_ARGS=--help.
bench: install
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# What callers without the API key can do to Herald's sends: each kind of hostile traffic (floods,
# slow and never-reading clients, slowhttptest, a huge Content-Length) while a client with the key
# sends, measured against its target, PASS or FAIL (about 3 minutes; not a test; `make test` runs
# short versions). Needs Postfix's smtp-sink and slowhttptest. Options: HOSTILE_ARGS=--help.
hostile: install
	$(BIN)/python bench/hostile.py $(HOSTILE_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
