"""Redis servers the tests start themselves on free loopback ports: a master and its replica,
sentinels, a Cluster. Debian's redis-server (sentinels run as `redis-server conf --sentinel`)."""

import subprocess
import time

import redis

from conftest import free_port, wait_for

MASTER_NAME = "herald"


class RedisProcesses:
    """Every process started here is ended by stop(), by its own Popen handle."""

    def __init__(self, directory):
        self.dir = directory
        self.procs = {}  # port -> Popen
        self.args = {}  # port -> its redis-server arguments, for restart()

    def _start(self, port, args):
        self.args[port] = args
        log = open(self.dir / f"redis-{port}.log", "a")
        self.procs[port] = subprocess.Popen(["redis-server", *args], cwd=self.dir, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: self._pings(port), timeout=10)
        return port

    def _pings(self, port):
        assert self.procs[port].poll() is None, (self.dir / f"redis-{port}.log").read_text()
        try:
            return redis.Redis(port=port, socket_timeout=1).ping()
        except redis.ConnectionError:
            return False

    def server(self, *args, port=None):
        port = port or free_port()
        workdir = self.dir / f"node-{port}"
        workdir.mkdir()
        return self._start(port, ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                  "--dir", str(workdir), *args])

    def replica(self, master):
        port = self.server("--replicaof", "127.0.0.1", str(master))
        wait_for(lambda: _info(port, "replication").get("master_link_status") == "up", timeout=10)
        return port

    def sentinel(self, master, quorum=2):
        port = free_port()
        conf = self.dir / f"sentinel-{port}.conf"  # sentinels rewrite their own file
        conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                        f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master} {quorum}\n"
                        # Seconds, not Redis's default 30 s, so a killed master is failed over quickly.
                        f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
                        f"sentinel failover-timeout {MASTER_NAME} 10000\n")
        return self._start(port, [str(conf), "--sentinel"])

    def _cluster_node(self, port=None):
        # cluster-port: the bus on a free port of its own, not the default port + 10000.
        return self.server("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                           "--cluster-node-timeout", "2000", "--cluster-port", str(free_port()), port=port)

    def cluster(self, ports, replicas=False):
        """A Cluster of one master on each port (chosen beforehand, e.g. by free_port); with
        `replicas`, a replica of each too: {master port: replica port}."""
        for port in ports:
            self._cluster_node(port)
        subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=30)
        pairs = {}
        for port in ports if replicas else ():
            master_id = redis.Redis(port=port, decode_responses=True).cluster("myid")
            pairs[port] = self._cluster_node()
            subprocess.run(["redis-cli", "--cluster", "add-node", f"127.0.0.1:{pairs[port]}", f"127.0.0.1:{port}",
                            "--cluster-slave", "--cluster-master-id", master_id],
                           check=True, capture_output=True, timeout=30)
        every = [*ports, *pairs.values()]
        wait_for(lambda: all(redis.Redis(port=p, decode_responses=True).cluster("info")["cluster_state"] == "ok"
                             for p in every), timeout=20)
        for replica in pairs.values():
            wait_for(lambda: _info(replica, "replication").get("master_link_status") == "up", timeout=20)
        return pairs

    def kill(self, port):
        self.procs[port].kill()
        self.procs[port].wait()

    def restart(self, port):
        """A killed node back, as its supervisor would bring it (no data: nothing is saved)."""
        return self._start(port, self.args[port])

    def stop(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _info(port, section):
    return redis.Redis(port=port, decode_responses=True).execute_command("INFO", section)


def sentinels_ready(sentinels, replicas=1, quorum=True):
    """Each sentinel knows the replicas, and with `quorum` the other sentinels (which a master's
    crash needs, SENTINEL FAILOVER not): a failover can start at once."""
    def ready():
        for port in sentinels:
            master = redis.Redis(port=port, decode_responses=True).sentinel_master(MASTER_NAME)
            if (quorum and master["num-other-sentinels"] < len(sentinels) - 1) or master["num-slaves"] < replicas:
                return False
        return True
    wait_for(ready, timeout=20)


def master_port(sentinel):
    return int(redis.Redis(port=sentinel, decode_responses=True).sentinel_get_master_addr_by_name(MASTER_NAME)[1])
