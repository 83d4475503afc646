"""A real SLURM cluster on this machine: munged, one slurmctld and two slurmd daemons as two nodes.

    python tests/slurm/local_cluster.py [--workdir DIR]      # as root; Ctrl-C stops it

installs Debian's `slurm-wlm` and `munge` when they are missing (apt-get), writes a slurm.conf
under DIR (default: a new temporary folder), starts the daemons in the foreground as child
processes — node1 at 127.0.0.2 and node2 at 127.0.0.3, everything on loopback, ports picked free —
prints `export SLURM_CONF=...` for sbatch/squeue/scontrol in another shell, and on Ctrl-C or
SIGTERM stops every daemon it started, by pid. tests/slurm/test_slurm.py uses the same class.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
BINARIES = (
    "munged",
    "munge",
    "slurmctld",
    "slurmd",
    "sbatch",
    "srun",
    "scontrol",
    "squeue",
    "sinfo",
    "scancel",
)
NODES = {"node1": "127.0.0.2", "node2": "127.0.0.3"}
LAUNCHER_VARS = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_SIZE",
    "LOCAL_WORLD_SIZE",
    "CROSS_RANK",
    "CROSS_SIZE",
    "GROUP_RANK",
)


class Unavailable(RuntimeError):
    """This machine cannot run the local cluster (the reason is the message)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_installed(log=print) -> None:
    """Install slurm-wlm and munge with apt-get when a binary is missing; Unavailable if it
    cannot."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise Unavailable(
            f"SLURM binaries missing ({', '.join(missing)}) and not root: cannot apt-get install"
        )
    if shutil.which("apt-get") is None:
        raise Unavailable(
            f"SLURM binaries missing ({', '.join(missing)}) and no apt-get on this machine"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log(f"installing {' '.join(PACKAGES)} (missing: {', '.join(missing)})")
    for cmd in (
        ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES],
        ["apt-get", "update"],  # only if the first try failed on stale lists
        ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES],
    ):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if cmd[1] == "install" and proc.returncode == 0:
            break
    still = [b for b in BINARIES if shutil.which(b) is None]
    if still:
        raise Unavailable(
            f"apt-get install {' '.join(PACKAGES)} failed (still missing {', '.join(still)}): "
            f"{(proc.stderr or proc.stdout).strip()[-500:]}"
        )


class LocalCluster:
    """munged + slurmctld + slurmd node1/node2, all children of this process, state under
    `workdir`."""

    def __init__(self, workdir: Path, cpus_per_node: int = 2):
        self.dir = Path(workdir).resolve()
        self.cpus = cpus_per_node
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.dir / "slurm.conf"

    # ------------------------------------------------------------ set-up
    def _write_config(self) -> None:
        d = self.dir
        for sub in ("state", "log", *(f"spool/{n}" for n in NODES)):
            (d / sub).mkdir(parents=True, exist_ok=True)
        key = d / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        host = socket.gethostname()
        ctld_port = _free_port()
        node_lines = "\n".join(
            f"NodeName={n} NodeAddr={addr} NodeHostname={host} Port={_free_port()} "
            f"CPUs={self.cpus} RealMemory=4000 State=UNKNOWN"
            for n, addr in NODES.items()
        )
        self.conf.write_text(
            f"""# A two-node SLURM cluster on one machine (tests/slurm/local_cluster.py)
ClusterName=rlhftest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# our own munged; cred_expire also sets how long a requeued job waits before it may start again
AuthInfo=socket={d}/munge.sock,cred_expire=10
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# look at the queue every few seconds (a requeued job restarts sooner)
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
KillWait=60
MinJobAge=3600
{node_lines}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _start(self, name: str, cmd: list[str]) -> None:
        out = open(self.dir / "log" / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env(),
            start_new_session=True,
        )
        out.close()

    def env(self) -> dict[str, str]:
        """The environment for SLURM commands (sbatch, squeue, ...) against this cluster.

        Without the rendezvous and rank variables a process of ours may carry (an in-process
        test's `init_distributed` sets MASTER_ADDR=127.0.0.1, MASTER_PORT, RANK, WORLD_SIZE in
        os.environ): sbatch exports its environment to the job, and job.sh takes a MASTER_ADDR it
        finds as the user's override of the first node's address.
        """
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
        return {**env, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60) -> None:
        if os.geteuid() != 0:
            raise Unavailable("the local SLURM cluster runs its daemons as root; not root here")
        ensure_installed()
        self._write_config()
        d = self.dir
        try:
            self._start(
                "munged",
                [
                    "munged",
                    "--foreground",
                    "--force",
                    f"--socket={d}/munge.sock",
                    f"--key-file={d}/munge.key",
                    f"--log-file={d}/log/munged.log",
                    f"--pid-file={d}/munged.pid",
                    f"--seed-file={d}/munged.seed",
                ],
            )
            self._wait(
                lambda: (
                    subprocess.run(
                        ["munge", "-S", f"{d}/munge.sock", "-n"], capture_output=True
                    ).returncode
                    == 0
                ),
                timeout,
                "munged",
            )
            self._start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            for node in NODES:
                self._start(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
            self._wait(self._nodes_idle, timeout, "both nodes idle in sinfo")
        except BaseException:
            self.stop()
            raise

    def _nodes_idle(self) -> bool:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise Unavailable(
                    f"{name} exited with code {p.returncode}: "
                    f"{(self.dir / 'log' / f'{name}.out').read_text()[-1500:]}"
                )
        r = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=self.env()
        )
        states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
        return r.returncode == 0 and all(states.get(n) == "idle" for n in NODES)

    @staticmethod
    def _wait(cond, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while not cond():
            if time.time() > deadline:
                raise Unavailable(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.5)

    # ------------------------------------------------------------ use
    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            list(cmd), capture_output=True, text=True, env=kw.pop("env", self.env()), **kw
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        fields = {}
        for item in out.split():
            if "=" in item:
                k, v = item.split("=", 1)
                fields.setdefault(k, v)
        return fields

    # ------------------------------------------------------------ tear-down
    def stop(self) -> None:
        """Cancel what still runs, then stop every daemon this object started, by pid."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(
                ["scancel", "--full", "--user", "root"],
                capture_output=True,
                env=self.env(),
                timeout=30,
            )
            deadline = time.time() + 30
            while time.time() < deadline:
                q = subprocess.run(
                    ["squeue", "-h", "-t", "R,CG"], capture_output=True, text=True, env=self.env()
                )
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.5)
        order = [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="state, logs and slurm.conf (default: a temp dir)",
    )
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="slurm-local-"))
    cluster = LocalCluster(workdir)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        cluster.start()
    except Unavailable as e:
        sys.exit(f"cannot start the local cluster: {e}")
    try:
        print(
            f"local SLURM cluster up ({', '.join(f'{n}={a}' for n, a in NODES.items())}); "
            f"daemon pids {', '.join(f'{n}={p.pid}' for n, p in cluster.procs.items())}\n"
            f"in another shell:\n  export SLURM_CONF={cluster.conf}\n  sinfo; sbatch --nodes=2 "
            f"launch/slurm/ppo.sbatch --config launch/configs/tiny.yaml "
            f"--output_dir runs/slurm-tiny\n"
            f"logs: {workdir}/log   Ctrl-C stops the daemons.",
            flush=True,
        )
        while all(p.poll() is None for p in cluster.procs.values()):
            time.sleep(1)
        print("a daemon exited; stopping the others", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
        print("daemons stopped", flush=True)


if __name__ == "__main__":
    main()
