"""Several processes for one command: StyleMix's commands started under accelerate's launcher.

    stylemix train DATA --name NAME --num-processes 4          # 4 GPUs of this machine (a job, as always)
    stylemix evaluate --config FILE --num-processes 4          # the protocol's images split over 4 GPUs
    ... --num-processes 16 --num-machines 2 --machine-rank R --main-process-ip IP --main-process-port PORT

StyleMix has no scheduler of its own: `Launch.run` hands the command to accelerate's launcher
(`accelerate.commands.launch.launch_command`, which runs torchrun's elastic agent) on GPUs, and to
torchrun itself on the CPU, because `accelerate launch --cpu --num_processes N` starts one process
(accelerate's CPU path expects MPI).  Both end in the same agent, which starts the processes, watches
them and, when one dies, stops the others and raises `ChildFailedError`; `Launch.run` turns that into
`LaunchFailed`, whose message names the process (rank) that failed first.

Inside a started process `distributed_state()` is accelerate's `PartialState`, checked: a CPU run must
ask accelerate for its CPU backend (gloo), or every process believes it is the only one and they all do
the whole job and write the same files (the `results.part0.csv` failure of issue 18).

`--num-processes` is the total over all machines, as in `accelerate launch`.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass

from stylemix.errors import StyleMixError

PROCESSES_ENV = "STYLEMIX_TRAIN_PROCESSES"  # the app's training jobs: processes per job (default 1)
# signs that a process failed only because another one died first (the collective it waited in broke)
_CONSEQUENCES = ("connection closed by peer", "connection reset by peer", "broken pipe", "nccl", "gloo",
                 "processgroup", "distbackenderror", "watchdog", "timed out")


class LaunchFailed(StyleMixError):
    """A process of a launched command failed; `rank`/`pid`/`signal`/`exitcode` describe the first one."""

    def __init__(self, message: str, rank: int | None = None, pid: int | None = None, exitcode: int | None = None,
                 signal: str | None = None, processes: int = 0):
        super().__init__(message)
        self.rank, self.pid, self.exitcode, self.signal, self.processes = rank, pid, exitcode, signal, processes


@dataclass
class Launch:
    num_processes: int = 1  # in all, over every machine
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int | None = None
    device: str | None = None  # "cpu" forces the CPU launcher; None: GPUs when CUDA is available

    @property
    def distributed(self) -> bool:
        return self.num_processes > 1 or self.num_machines > 1

    @property
    def per_machine(self) -> int:
        return self.num_processes // self.num_machines

    @classmethod
    def from_dict(cls, d: dict | None) -> "Launch":
        return cls(**(d or {})).validate()

    @classmethod
    def from_env(cls, device: str | None = None) -> "Launch":
        raw = os.environ.get(PROCESSES_ENV, "").strip() or "1"
        try:
            n = int(raw)
        except ValueError:
            raise StyleMixError(f"{PROCESSES_ENV}={raw!r}: give a whole number of processes, e.g. 2.") from None
        return cls(num_processes=n, device=device).validate()

    def as_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> "Launch":
        for name in ("num_processes", "num_machines"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise StyleMixError(f"--{name.replace('_', '-')} {v!r}: give a whole number of at least 1.")
        if self.num_processes % self.num_machines:
            raise StyleMixError(f"--num-processes {self.num_processes} is the total over all machines: it must be a "
                                f"multiple of --num-machines {self.num_machines} (the same number on each).")
        if not 0 <= self.machine_rank < self.num_machines:
            raise StyleMixError(f"--machine-rank {self.machine_rank}: give 0 to {self.num_machines - 1} "
                                "(0 on the machine that holds the main process).")
        if self.num_machines > 1 and not (self.main_process_ip and self.main_process_port):
            raise StyleMixError("Several machines need --main-process-ip and --main-process-port: the address of "
                                "machine 0, which every machine can reach.")
        if self.distributed and self.device and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise StyleMixError(f"Several processes run on CUDA GPUs or the CPU; device {self.device!r} runs one.")
        if self.distributed and not self.on_cpu:
            import torch

            gpus = torch.cuda.device_count()
            if self.per_machine > gpus:
                raise StyleMixError(f"{self.per_machine} processes per machine need {self.per_machine} GPUs; this "
                                    f"machine has {gpus}. Use --num-processes {gpus * self.num_machines} or fewer.")
        return self

    @property
    def on_cpu(self) -> bool:
        return use_cpu(self.device, distributed=True)

    # ---- the launcher's command line
    def launcher_argv(self, module: str, args: list[str]) -> tuple[str, list[str]]:
        """('accelerate' | 'torchrun', its argument list) that starts `python -m module args` on each process."""
        if self.on_cpu:
            argv = ["--nproc-per-node", str(self.per_machine)]
            if self.num_machines == 1:
                argv += ["--standalone"]  # a free port of its own: two runs on one machine never collide
            else:
                argv += ["--nnodes", str(self.num_machines), "--node-rank", str(self.machine_rank),
                         "--master-addr", str(self.main_process_ip), "--master-port", str(self.main_process_port)]
            return "torchrun", argv + ["--module", module, *args]
        argv = ["--multi_gpu", "--num_processes", str(self.num_processes), "--num_machines", str(self.num_machines),
                "--mixed_precision", "no", "--dynamo_backend", "no"]  # the trainer sets its own precision
        if self.num_machines > 1:
            argv += ["--machine_rank", str(self.machine_rank), "--main_process_ip", str(self.main_process_ip),
                     "--main_process_port", str(self.main_process_port)]
        else:
            argv += ["--main_process_port", str(self.main_process_port or 0)]  # 0: a free port
        return "accelerate", argv + ["-m", module, *args]

    def command_line(self, module: str, args: list[str]) -> list[str]:
        """The same start as a shell command (for the docs, logs and a user who wants to run it by hand)."""
        kind, argv = self.launcher_argv(module, args)
        runner = "torch.distributed.run" if kind == "torchrun" else "accelerate.commands.launch"
        return [sys.executable, "-m", runner, *argv]

    def run(self, module: str, args: list[str]) -> None:
        """Run `python -m module args` on this machine's processes under the launcher, in this process (the
        launcher's agent starts and watches them).  Returns when all ended well; raises LaunchFailed naming
        the first process that failed, or SystemExit when this process was told to stop (SIGTERM, Ctrl-C)."""
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

        kind, argv = self.launcher_argv(module, args)
        try:
            if kind == "torchrun":
                import torch.distributed.run as torchrun

                torchrun.run(torchrun.parse_args(argv))
            else:
                from accelerate.commands.launch import launch_command, launch_command_parser

                launch_command(launch_command_parser().parse_args(argv))
        except ChildFailedError as e:
            raise describe_failure(e.failures, self.num_processes) from None
        except KeyboardInterrupt:
            raise SystemExit(130) from None
        except Exception as e:  # noqa: BLE001  (the agent's own errors: rendezvous, ports)
            if type(e).__name__ == "SignalException":
                raise SystemExit(128 + int(getattr(e, "sigval", 15))) from None
            raise


def add_launch_arguments(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group("several processes (accelerate's launcher; torchrun on the CPU)")
    g.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help=f"{what} on N processes, one GPU each (the CPU without GPUs); N in all over every machine "
                        f"(default: 1{', or $' + PROCESSES_ENV if what.startswith('train') else ''})")
    g.add_argument("--num-machines", type=int, default=1, metavar="M", help="machines taking part (default 1)")
    g.add_argument("--machine-rank", type=int, default=0, metavar="R", help="this machine's number, 0 to M-1")
    g.add_argument("--main-process-ip", default=None, metavar="IP", help="machine 0's address (several machines)")
    g.add_argument("--main-process-port", type=int, default=None, metavar="PORT",
                   help="a free port on machine 0 (several machines)")


def launch_from_args(args, env_default: bool = False) -> Launch:
    """The Launch of a command's --num-processes ... options (`env_default`: no --num-processes means
    $STYLEMIX_TRAIN_PROCESSES, as for the app's jobs)."""
    device = getattr(args, "device", None)
    n = args.num_processes
    if n is None:
        n = Launch.from_env(device).num_processes if env_default else 1
    return Launch(num_processes=n, num_machines=args.num_machines, machine_rank=args.machine_rank,
                  main_process_ip=args.main_process_ip, main_process_port=args.main_process_port,
                  device=device).validate()


# --------------------------------------------------------------------------- inside a started process


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def process_rank() -> tuple[int, int, int]:
    """(rank, local rank, world size) from the launcher's environment; (0, 0, 1) for a process started alone."""
    return int(os.environ.get("RANK", "0") or 0), int(os.environ.get("LOCAL_RANK", "0") or 0), world_size()


def use_cpu(device: str | None, distributed: bool | None = None) -> bool:
    """Whether accelerate must be asked for the CPU: an explicit cpu device, or several processes and no GPU.

    A single process left to pick (None) keeps accelerate's own choice (CUDA, then mps, then the CPU)."""
    if device:
        return device.split(":")[0] == "cpu"
    if distributed is None:
        distributed = world_size() > 1
    if not distributed:
        return False
    import torch

    return not torch.cuda.is_available()


def check_world(num_processes: int) -> None:
    """Refuse to run when accelerate sees fewer processes than the launcher started (each would do the whole job)."""
    if world_size() > 1 and num_processes != world_size():
        raise StyleMixError(f"Started as {world_size()} processes, but accelerate sees {num_processes}: give "
                            "--device cpu on a machine without GPUs, or start one process per GPU.")


def distributed_state(device: str | None = None):
    """accelerate's PartialState when started as several processes, else None (one process does everything)."""
    if world_size() <= 1:
        return None
    from accelerate import PartialState

    state = PartialState(cpu=use_cpu(device))
    check_world(state.num_processes)
    exit_with_parent()
    return state


_watching = False


def exit_with_parent(interval: float = 1.0) -> None:
    """End this process when the launcher that started it is gone (killed with SIGKILL, it cannot stop its
    processes; each one starts a session of its own, so nothing else would reach them)."""
    global _watching
    if _watching or world_size() <= 1:
        return
    _watching = True
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                print(f"stylemix: rank {os.environ.get('RANK')}: the launcher is gone; stopping.", file=sys.stderr)
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="stylemix-parent-watch").start()


# --------------------------------------------------------------------------- failures


def describe_failure(failures: dict, processes: int) -> LaunchFailed:
    """One readable LaunchFailed from torchrun's {rank: ProcessFailure}: the process that failed first.

    A process killed by a signal, or one whose error is not a broken collective, is the cause; the others
    failed because it did (their all-reduce lost a peer, or the launcher stopped them with SIGTERM), so
    they are only counted."""
    def order(item):
        rank, f = item
        stopped = f.exitcode == -signal.SIGTERM  # how the launcher ends the processes still running
        return (stopped, f.exitcode >= 0, is_consequence(_message(f)), f.timestamp, rank)

    rank, f = sorted(failures.items(), key=order)[0]
    if f.exitcode < 0:
        what = f"was killed by {f.signal_name()}"
    else:
        msg = _message(f)
        what = f"exited with code {f.exitcode}" + (f" ({msg})" if msg else "")
    text = f"Process rank {rank} of {processes} (pid {f.pid}) {what}; the launcher stopped the others."
    return LaunchFailed(text, rank=int(rank), pid=f.pid, exitcode=f.exitcode,
                        signal=f.signal_name() if f.exitcode < 0 else None, processes=processes)


def is_consequence(message: str) -> bool:
    """The error of a process whose collective broke because another process died."""
    return any(w in message.lower() for w in _CONSEQUENCES)


def _message(f) -> str:
    m = f.message
    if isinstance(m, dict):
        m = m.get("message", "")
    m = str(m or "").strip()
    if m.startswith("To enable traceback") or m == "<NONE>":
        return ""
    return m.splitlines()[-1][:400] if m else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
