#!/usr/bin/env python3
"""How busy a target was over an interval: the busy seconds it counted per second of wall time
(summed over its cores, so two busy cores make 2.0). The benchmarks divide it by the IOPS
measured over the same interval to get the target's busy time per I/O.

    busy.py [--delay S] [--window S] reactors SOCK   iscsi-tgt: reactors/N/busy_ns, all N
    busy.py [--delay S] [--window S] spdk SOCK       SPDK-style JSON-RPC: framework_get_reactors
                                                     (busy ticks over tick_rate, all reactors)
    busy.py [--delay S] [--window S] proc PID        a process's CPU time (utime + stime)

It sleeps --delay seconds (a run's ramp-up), reads the counter, sleeps --window seconds, reads
it again and prints the share. With --from T0 --to T1 (seconds since the epoch) it reads at
those moments instead: Python's start takes up to half a second on a loaded machine, so a
benchmark fixes the interval before it starts this and its load. A start after T1 is an error.
Errors go to stderr with exit status 1.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "rpc"))
import rpc  # noqa: E402  (the repository's own JSON-RPC client)


def reactors_busy_s(sock):
    names = [e["name"] for e in rpc.call(sock, "ls", {"path": "reactors"}, 10.0)]
    return sum(int(rpc.call(sock, "get", {"path": f"reactors/{n}/busy_ns"}, 10.0)) for n in names) / 1e9


def spdk_busy_s(sock):
    r = rpc.call(sock, "framework_get_reactors", None, 10.0)
    rate = float(r["tick_rate"])
    if rate <= 0:
        raise rpc.RpcError(f"framework_get_reactors gave tick_rate {rate}")
    return sum(int(x["busy"]) for x in r["reactors"]) / rate


def proc_busy_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces: the fields start after its closing parenthesis.
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of proc(5), 12 and 13 after the name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    p = argparse.ArgumentParser(prog="busy.py")
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--window", type=float, default=1.0)
    p.add_argument("--from", dest="t0", type=float, help="first read at this time (epoch seconds)")
    p.add_argument("--to", dest="t1", type=float, help="second read at this time (epoch seconds)")
    p.add_argument("kind", choices=["reactors", "spdk", "proc"])
    p.add_argument("what", help="RPC socket, or PID for proc")
    a = p.parse_args()
    read = {"reactors": reactors_busy_s, "spdk": spdk_busy_s, "proc": proc_busy_s}[a.kind]
    if (a.t0 is None) != (a.t1 is None):
        p.error("--from and --to go together")
    if a.t0 is not None:
        now = time.time()
        if now > a.t1 - 0.05:
            print(f"busy.py: started {now - a.t0:.2f} s after --from, too late for the interval", file=sys.stderr)
            sys.exit(1)
        delay, window = max(a.t0 - now, 0.0), None
    else:
        delay, window = a.delay, a.window
    try:
        time.sleep(delay)
        b0, t0 = read(a.what), time.monotonic()
        if window is None:
            window = max(a.t1 - time.time(), 0.05)
        time.sleep(window)
        b1, t1 = read(a.what), time.monotonic()
    except (rpc.RpcError, OSError, KeyError, ValueError, IndexError) as e:
        print(f"busy.py: {a.kind} {a.what}: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"{(b1 - b0) / (t1 - t0):.6f}")


if __name__ == "__main__":
    main()
