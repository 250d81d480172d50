"""gunicorn settings for herald-smtp: `gunicorn -c gunicorn.conf.py app:app`.

Everything comes from the environment and the env file (`ENV_FILE`, else `.env`; the real
environment wins), parsed by the same loader the app uses, in the master, at start and at every
reload (SIGHUP); the workers inherit what the master parsed.
"""

import glob
import logging
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from herald_smtp import config as herald_config, logs  # noqa: E402  (neither imports prometheus_client)
from herald_smtp.store import opener as store_opener  # noqa: E402  (nor does this)

# At start a bad value stops the master with one line; at a reload (HUP, which runs this file
# again) it is logged, and the workers gunicorn starts now inherit the configuration in force.
_at_reload = herald_config.reloading()
try:
    _cfg, _reload_error = herald_config.load_server_config()
    if not _at_reload:
        # The SQLite file is laid out (or refused) here, once, before any worker opens it.
        store_opener.prepare(_cfg.idempotency_store, _cfg.idempotency_max_entries, _cfg.sender_scope)
except herald_config.ConfigError as e:
    logs.config_error(str(e))
    sys.exit(2)
if _reload_error is not None:
    logs.config_error(str(_reload_error), at_reload=True)
else:
    logs.setup(_cfg.log_level)
    for _level, _line in herald_config.warnings(_cfg):
        logging.getLogger("herald_smtp.config").log(logging.getLevelName(_level.upper()), _line)

# prometheus_client picks multiprocess mode when first imported (herald_smtp's app imports it),
# so the directory is named before that: by default a private temp dir, emptied in on_starting.
_METRICS_PREFIX = "herald-smtp-metrics-"
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _cfg.prometheus_multiproc_dir or tempfile.mkdtemp(prefix=_METRICS_PREFIX)
from prometheus_client import Counter, multiprocess  # noqa: E402


def _remove_own_metrics_dir():
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    parent, name = os.path.split(directory)
    if parent == tempfile.gettempdir() and name.startswith(_METRICS_PREFIX):
        shutil.rmtree(directory, ignore_errors=True)  # ours, made above


bind = [_cfg.bind]
# gthread: each worker thread keeps its own SMTP connection open between requests. Ours reads
# each request in the worker's main loop (h11 frames it) and gives it to a thread only when it has
# all arrived, within HTTP_HEADER_TIMEOUT_SECONDS and HTTP_BODY_TIMEOUT_SECONDS; the main loop
# writes the answer (herald_smtp/http/worker.py).
worker_class = "herald_smtp.http.worker.ThreadWorker"
workers = _cfg.web_concurrency
threads = _cfg.web_threads
# In-flight sends get their whole SMTP deadline to finish on SIGTERM, plus a margin.
graceful_timeout = int(_cfg.smtp_timeout_seconds) + 5
# Heartbeat only (gthread notifies from its main loop); generous so a slow send never trips it.
timeout = int(_cfg.smtp_timeout_seconds) + 30
keepalive = 5
# gunicorn 27's control socket lives in $HOME, which the service user may not have.
control_socket_disable = True
# A header block larger than this is no Herald request; the worker holds at most this much
# (about 135 KB) of a head that is still arriving.
limit_request_field_size = 4094
limit_request_fields = 32
# The proxies (nginx, a load balancer) whose X-Forwarded-Proto gunicorn believes, and whose
# X-Forwarded-For gives the access log's `client`: FORWARDED_ALLOW_IPS, none by default (gunicorn's
# own default trusts 127.0.0.1, where another local process could then forge a client's address).
forwarded_allow_ips = ",".join(_cfg.forwarded_allow_ips)
accesslog = "-"  # stderr too: GunicornLogger keeps every line on one stream
errorlog = "-"
loglevel = "warning" if _cfg.log_level in ("WARN", "WARNING", "ERROR") else "info"


# Every line gunicorn writes (its own messages and the access log) is JSON in our schema, on stderr.
logger_class = logs.GunicornLogger


def post_worker_init(worker):
    """One line once a worker has loaded the app and starts to accept (tests and the benchmark wait
    for every worker's: one still loading takes no connection)."""
    worker.log.info("Worker ready (pid: %s)", worker.pid)


def worker_exit(server, worker):
    """QUIT this worker's SMTP connections and close its store handles."""
    app = getattr(worker, "wsgi", None)
    service = getattr(app, "extensions", {}).get("herald_smtp") if app is not None else None
    if service is not None:
        service.close()


def on_starting(server):
    """Each start counts from zero: a previous run's files would otherwise be added in."""
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(directory, exist_ok=True)
    for path in glob.glob(os.path.join(directory, "*.db")):
        os.remove(path)
    # The master's own counter, in that directory beside the workers' (so /metrics adds it in);
    # kept on the arbiter, since a reload runs this file again.
    server.herald_restarts = Counter("herald_smtp_worker_restarts", "gunicorn workers started to replace one "
                                     "that died (a crash, an out-of-memory kill, a timeout); not those of a start "
                                     "or a reload.", registry=None)
    server.herald_planned_starts = server.num_workers


# Every worker gunicorn starts goes through pre_fork. The master plans the starts of a start (above),
# of a reload (cfg.workers new ones) and of TTIN (one more); any other start replaces a worker that died.
def nworkers_changed(server, new_value, old_value):
    if old_value is not None and new_value > old_value:
        server.herald_planned_starts = getattr(server, "herald_planned_starts", 0) + new_value - old_value


def on_reload(server):
    server.herald_planned_starts = server.cfg.workers  # nworkers_changed ran just before: not counted twice


def pre_fork(server, worker):
    if server.herald_planned_starts > 0:
        server.herald_planned_starts -= 1
    else:
        server.herald_restarts.inc()


def child_exit(server, worker):
    """A dead worker has no sends in flight; its counters stay in the totals."""
    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    _remove_own_metrics_dir()
