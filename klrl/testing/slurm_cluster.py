"""A real, private, single-node SLURM cluster for tests, CI and manual use.

Slurm 22.05 (Debian bookworm) with accounting (slurmdbd + MariaDB). Everything lives
under one root directory; nothing in /etc/slurm, /run/munge or /var/lib/mysql is
touched, so two clusters never share a daemon, socket, port, database or ClusterName.

    python -m klrl.testing.slurm_cluster start ROOT   # prints `export SLURM_CONF=...`
    python -m klrl.testing.slurm_cluster stop ROOT

Layout of ROOT: etc/ (slurm.conf, slurmdbd.conf), munge/ (owned by the munge user:
key, socket, pidfile, log), mysql/ (datadir, socket, pidfile, log), state/, run/
(pidfiles), log/. Every start picks four free TCP ports (SlurmctldPort, SlurmdPort,
DbdPort = AccountingStoragePort, and MariaDB, which listens on 127.0.0.1 only) and
writes them into the configs; clients only need SLURM_CONF. A small race remains
between picking a port and the daemon binding it.

munged runs as the munge user, so ROOT and all its parents must be searchable by it:
pytest's basetemp (mode 0700) is not; a directory under /tmp is.

Pytest: `from klrl.testing.slurm_cluster import slurm_cluster` in a conftest.py gives
a session-scoped fixture.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client", "slurmdbd", "mariadb-server")
PARTITION = "debug"

# Why a requeued job waited ~2 min: when Slurm requeues a batch job it sets the job's
# begin time to now + cred_expire + 1, so that the new launch credential is newer than
# the revocation of the old one that slurmd keeps for cred_expire seconds (`man
# slurm.conf`, AuthInfo: cred_expire "also controls how long a requeued job must wait
# before starting again"; default 120 s, values below 5 are rejected). Once the begin
# time has passed, only the periodic main scheduling loop (sched_interval, default 60 s)
# starts the job (the backfill loop left it pending with reason BeginTime), so we also
# set sched_interval=2. Measured: `scontrol requeue` to RUNNING again 12 s (was 39-56 s
# with cred_expire=10 and the default sched_interval). MinJobAge, BatchStartTimeout and
# JobRequeue do not affect the delay. cred_expire is also the window in which a job or
# step launch credential must be used, so it should not be tiny on a loaded machine.
CRED_EXPIRE_S = 10


def _tail(path: Path, n: int = 30) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError as e:
        return f"--- {path}: unreadable ({e}) ---"
    return f"--- last {min(n, len(lines))} lines of {path} ---\n" + "\n".join(lines[-n:])


def _run(cmd, *, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode:
        raise RuntimeError(f"`{shlex.join(map(str, cmd))}` failed (rc {r.returncode}):\n{r.stdout}{r.stderr}")
    return r


def install_packages() -> None:
    """apt-get install the SLURM + MariaDB packages that are missing; raise if that fails."""
    if shutil.which("dpkg-query") is None:
        raise RuntimeError("the SLURM test cluster needs a Debian/Ubuntu system with apt")

    def installed(pkg: str) -> bool:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
        return r.returncode == 0 and r.stdout.endswith("install ok installed")

    missing = [p for p in PACKAGES if not installed(p)]
    if not missing:
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"SLURM packages {missing} are missing and installing them needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "-qq", "update"],
                ["apt-get", "-qq", "-y", "--no-install-recommends", "install", *missing]):
        try:
            _run(cmd, env=env, timeout=900)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(f"installing SLURM packages {missing} failed: {e}") from e
    if still := [p for p in missing if not installed(p)]:
        raise RuntimeError(f"apt-get reported success but {still} are still not installed")


def _free_ports(n: int) -> list[int]:
    # Hold all sockets open together so the n ports are distinct; bind "" (all
    # interfaces) because slurmctld/slurmd listen on all interfaces.
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, comm: str | None = None) -> bool:
    """Running (zombies count as dead) and, if given, named `comm` (guards against pid reuse)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    name, state = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2]
    return state not in "ZX" and (comm is None or name == comm)


def _terminate(pid: int, comm: str, grace: float = 10.0) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not _alive(pid, comm):
            return
        os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while _alive(pid, comm) and time.monotonic() < deadline:
            time.sleep(0.05)
    if _alive(pid, comm):
        raise RuntimeError(f"{comm} (pid {pid}) survived SIGKILL")


class LocalSlurmCluster:
    """Single-node SLURM cluster with accounting, all state under `root`."""

    partition = PARTITION

    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()
        # ClusterName is unique per root: StateSaveLocation records it (slurmctld refuses
        # to start on another cluster's state) and it prefixes the accounting tables.
        self.name = "klrl" + hashlib.sha1(str(self.root).encode()).hexdigest()[:10]
        self.conf = self.root / "etc" / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf)}
        self.start_seconds: float | None = None
        self._munge = self.root / "munge"
        self._mysql = self.root / "mysql"
        log, run = self.root / "log", self.root / "run"
        # name -> (process name in /proc/PID/stat, pidfile, log); in start order.
        self._daemons = {
            "mariadb": ("mariadbd", self._mysql / "mariadbd.pid", self._mysql / "error.log"),
            "munged": ("munged", self._munge / "munged.pid", self._munge / "munged.log"),
            "slurmdbd": ("slurmdbd", run / "slurmdbd.pid", log / "slurmdbd.log"),
            "slurmctld": ("slurmctld", run / "slurmctld.pid", log / "slurmctld.log"),
            "slurmd": ("slurmd", run / "slurmd.pid", log / "slurmd.log"),
        }

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "LocalSlurmCluster":
        if self.running():
            raise RuntimeError(f"a SLURM cluster already runs from {self.root}; stop it first")
        for _, pidfile, _ in self._daemons.values():
            pidfile.unlink(missing_ok=True)  # stale after a crash; would read as "died"
        t0 = time.monotonic()
        try:
            self._write_configs()
            self._start_mariadb()
            self._start_munged()
            self._start_slurmdbd()
            self._start_slurm()
        except BaseException:
            self.stop()  # never leave half a cluster behind
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Cancel jobs, then stop daemons in reverse start order; idempotent."""
        if self._pid("slurmctld") and self._pid("slurmd"):
            # Cancel while slurmd still runs, so slurmstepd kills the job processes.
            self._client(["scancel", "--partition", self.partition], check=False)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                r = self._client(["squeue", "-h", "-o", "%i"], check=False)
                if r.returncode or not r.stdout.strip():
                    break
                time.sleep(0.2)
        for name in reversed(self._daemons):
            comm, pidfile, _ = self._daemons[name]
            if pid := self._pid(name):
                _terminate(pid, comm)
            pidfile.unlink(missing_ok=True)
        # slurmstepd outlives slurmd; ours are recognisable by the SLURM_CONF they inherit.
        marker = f"SLURM_CONF={self.conf}\0".encode()
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                mine = (proc / "comm").read_text().strip() == "slurmstepd" and \
                    marker in (proc / "environ").read_bytes()
            except OSError:
                continue
            if mine:
                _terminate(int(proc.name), "slurmstepd", grace=2)

    def running(self) -> bool:
        return any(self._pid(name) for name in self._daemons)

    def __enter__(self) -> "LocalSlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers
    def _pid(self, name: str) -> int | None:
        comm, pidfile, _ = self._daemons[name]
        pid = _read_pid(pidfile)
        return pid if pid and _alive(pid, comm) else None

    def _client(self, cmd, **kw) -> subprocess.CompletedProcess:
        return _run(cmd, env={**os.environ, **self.env}, **kw)

    def _launch(self, name: str, cmd: list, **kw) -> None:
        """Run a command that daemonizes (or setsid -f); its stdout/stderr go to a file,
        because a daemon holding our pipe open would make subprocess wait forever."""
        out = self.root / "log" / f"{name}.out"
        with open(out, "ab") as f:
            r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                               env={**os.environ, **self.env}, cwd="/", timeout=120, **kw)
        if r.returncode:
            log = self._daemons[name][2] if name in self._daemons else out
            raise RuntimeError(f"SLURM cluster {self.root}: `{shlex.join(map(str, cmd))}` failed "
                               f"(rc {r.returncode})\n{_tail(out)}\n{_tail(log)}")

    def _wait(self, what: str, ready, name: str, timeout: float = 60.0) -> None:
        comm, pidfile, log = self._daemons[name]
        deadline = time.monotonic() + timeout
        while not ready():
            pid = _read_pid(pidfile)
            if pid is not None and not _alive(pid, comm):
                problem = f"{name} (pid {pid}) died"
            elif time.monotonic() > deadline:
                problem = f"timed out after {timeout:.0f} s"
            else:
                time.sleep(0.2)
                continue
            raise RuntimeError(f"SLURM cluster {self.root}: waiting for {what}: {problem}\n"
                               f"{_tail(log)}\n{_tail(self.root / 'log' / f'{name}.out', 10)}")

    def _ok(self, cmd) -> bool:
        try:
            return self._client(cmd, check=False, timeout=20).returncode == 0
        except subprocess.TimeoutExpired:  # e.g. a daemon that accepts but never answers
            return False

    # ------------------------------------------------------------------ configs
    def _write_configs(self) -> None:
        """Pick ports and a DB password, then write slurm.conf, slurmdbd.conf and munged's key."""
        for d in ("etc", "log", "run", "state/ctld", "state/slurmd", "mysql/data"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self._ports = dict(zip(("ctld", "slurmd", "dbd", "mysql"), _free_ports(4)))
        self._db_password = secrets.token_hex(16)
        self.conf.write_text(self._slurm_conf())
        self._write_slurmdbd_conf()
        self._prepare_munge()

    def _slurm_conf(self) -> str:
        mem_mib = next(int(line.split()[1]) // 1024 for line in open("/proc/meminfo")
                       if line.startswith("MemTotal:"))
        p, r, munge_sock = self._ports, self.root, self._munge / "munged.sock"
        # No GresTypes and no cgroup plugins (ProctrackType/TaskPlugin below), so
        # slurmd needs neither cgroup.conf nor gres.conf, nor systemd or GPUs.
        return f"""\
ClusterName={self.name}
SlurmctldHost=localhost
SlurmctldPort={p['ctld']}
SlurmdPort={p['slurmd']}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Private munged socket; cred_expire sets the requeue delay (see CRED_EXPIRE_S).
AuthInfo=socket={munge_sock},cred_expire={CRED_EXPIRE_S}
StateSaveLocation={r}/state/ctld
SlurmdSpoolDir={r}/state/slurmd
SlurmctldPidFile={self._daemons['slurmctld'][1]}
SlurmdPidFile={self._daemons['slurmd'][1]}
SlurmctldLogFile={self._daemons['slurmctld'][2]}
SlurmdLogFile={self._daemons['slurmd'][2]}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
JobRequeue=1
MailProg=/bin/true
# A node whose slurmd (re)registers is usable again, even after an unclean stop.
ReturnToService=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={p['dbd']}
# Clients authenticate to slurmdbd with this munged socket, not the AuthInfo one.
AccountingStoragePass={munge_sock}
JobAcctGatherType=jobacct_gather/linux
NodeName=localhost NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={max(1024, mem_mib - 2048)} State=UNKNOWN
PartitionName={PARTITION} Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""

    def _write_slurmdbd_conf(self) -> None:
        # slurmdbd finds slurmdbd.conf beside $SLURM_CONF and insists on mode 600.
        dbd = self.conf.with_name("slurmdbd.conf")
        fd = os.open(dbd, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"""\
AuthType=auth/munge
AuthInfo=socket={self._munge / "munged.sock"}
DbdHost=localhost
DbdPort={self._ports['dbd']}
SlurmUser=root
PidFile={self._daemons['slurmdbd'][1]}
LogFile={self._daemons['slurmdbd'][2]}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={self._ports['mysql']}
StorageUser=slurm
StoragePass={self._db_password}
StorageLoc=slurm_acct_db
""")

    def _prepare_munge(self) -> None:
        # munged runs as munge, so it owns its directory; checked before any daemon starts.
        self._munge.mkdir(mode=0o755, exist_ok=True)
        shutil.chown(self._munge, "munge", "munge")
        if _run(["test", "-w", self._munge], user="munge", check=False).returncode:
            raise RuntimeError(f"the munge user cannot write {self._munge}: every parent of "
                               f"{self.root} must be searchable by others (use a directory under /tmp)")
        key = self._munge / "munge.key"
        if not key.exists():
            key.write_bytes(secrets.token_bytes(128))  # munged refuses keys readable by others
            key.chmod(0o400)
            shutil.chown(key, "munge", "munge")

    # ------------------------------------------------------------------ daemons
    def _start_mariadb(self) -> None:
        data, sock = self._mysql / "data", self._mysql / "mysqld.sock"
        # --no-defaults everywhere: /etc/mysql would point at the system datadir/socket.
        if not (data / "mysql").is_dir():
            self._launch("mariadb-install-db", [
                "mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
                "--auth-root-authentication-method=socket", "--skip-test-db"])
        _, pidfile, log = self._daemons["mariadb"]
        self._launch("mariadb", [
            "setsid", "-f", "mariadbd", "--no-defaults", "--user=root", f"--datadir={data}",
            f"--socket={sock}", f"--pid-file={pidfile}", f"--log-error={log}",
            "--bind-address=127.0.0.1", f"--port={self._ports['mysql']}", "--skip-name-resolve",
            # Durability is worthless for a throwaway test DB. slurmdbd wants a long lock
            # wait; its "not recommended values: innodb_buffer_pool_size" log line is
            # harmless (even 256M did not satisfy it; a test DB needs far less).
            "--innodb-flush-log-at-trx-commit=0", "--innodb-doublewrite=0",
            "--innodb-lock-wait-timeout=900"])
        sql = ["mariadb", "--no-defaults", f"--socket={sock}", "-uroot"]
        self._wait("MariaDB", lambda: self._ok(sql + ["-e", "SELECT 1"]), "mariadb")
        self._client(sql + ["-e",
            f"CREATE OR REPLACE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{self._db_password}';"
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"])

    def _start_munged(self) -> None:
        # A private munged: the system socket may belong to another munged (or cluster)
        # whose lifetime we do not control.
        key = self._munge / "munge.key"
        _, pidfile, log = self._daemons["munged"]
        sock = self._munge / "munged.sock"
        self._launch("munged", [
            "munged", f"--socket={sock}", f"--key-file={key}", f"--pid-file={pidfile}",
            f"--log-file={log}", f"--seed-file={self._munge / 'munged.seed'}"],
            user="munge", group="munge", extra_groups=[])
        self._wait("munged", lambda: self._ok(["munge", "-n", "-S", sock]), "munged", 20)

    def _start_slurmdbd(self) -> None:
        self._launch("slurmdbd", ["slurmdbd"])
        listed = ["sacctmgr", "-n", "-P", "show", "cluster", "format=cluster"]
        self._wait("slurmdbd", lambda: self._ok(listed), "slurmdbd")
        # Register before slurmctld starts, so it finds its cluster on first contact.
        if self.name not in self._client(listed).stdout.split():
            self._client(["sacctmgr", "-i", "add", "cluster", self.name])

    def _start_slurm(self) -> None:
        self._launch("slurmctld", ["slurmctld"])
        self._wait("slurmctld", lambda: self._ok(["scontrol", "ping"]), "slurmctld")
        # -N: the node is "localhost" whatever the machine's hostname is.
        self._launch("slurmd", ["slurmd", "-N", "localhost"])
        state = ["sinfo", "-h", "-N", "-n", "localhost", "-o", "%T"]
        self._wait("node localhost to be idle",
                   lambda: self._client(state, check=False).stdout.strip() == "idle", "slurmd")


try:
    import pytest
except ImportError:  # the CLI does not need pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def slurm_cluster():
        """A started LocalSlurmCluster; os.environ points clients at it meanwhile."""
        install_packages()
        # Not tmp_path_factory: its basetemp is 0700 and munged runs as munge.
        root = Path(tempfile.mkdtemp(prefix="klrl-slurm-"))
        root.chmod(0o755)
        cluster = LocalSlurmCluster(root)
        saved = {k: os.environ.get(k) for k in cluster.env}
        with cluster:
            os.environ.update(cluster.env)
            try:
                yield cluster
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m klrl.testing.slurm_cluster",
                                     description="Start or stop a private single-node SLURM cluster.")
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("root", type=Path, help="directory holding all configs, state and logs")
    args = parser.parse_args(argv)
    cluster = LocalSlurmCluster(args.root)
    if args.action == "stop":
        cluster.stop()
        return
    install_packages()
    cluster.root.mkdir(parents=True, exist_ok=True)
    cluster.start()
    print(f"# cluster {cluster.name} up in {cluster.start_seconds:.1f} s, partition {cluster.partition}",
          file=sys.stderr)
    for k, v in cluster.env.items():
        print(f"export {k}={shlex.quote(v)}")


if __name__ == "__main__":
    main()
