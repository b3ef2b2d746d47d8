#!/usr/bin/env python3
"""Client of the iscsi-tgt JSON-RPC socket (Python standard library only).

    rpc.py [-s SOCK] [-t TIMEOUT] ls [PATH]
    rpc.py get PATH                  like cat
    rpc.py set PATH VALUE            like echo VALUE > PATH
    rpc.py mgmt PATH "COMMAND"       like echo COMMAND > PATH/mgmt
    rpc.py tree [PATH]
    rpc.py save_config
    rpc.py load_config FILE|-
    rpc.py rpc_get_methods
    rpc.py call METHOD [JSON-PARAMS]

On an error the server's message goes to stderr and the exit status is 1.
"""
import argparse
import json
import socket
import sys

DEFAULT_SOCK = "/var/tmp/iscsi-tgt.sock"


class RpcError(Exception):
    pass


def call(sock_path, method, params=None, timeout=60.0):
    req = {"jsonrpc": "2.0", "id": 1, "method": method}
    if params is not None:
        req["params"] = params
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(sock_path)
    except OSError as e:
        raise RpcError(f"cannot connect to {sock_path}: {e}")
    s.sendall(json.dumps(req).encode())
    buf = ""
    dec = json.JSONDecoder()
    while True:
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            raise RpcError(f"no answer from {sock_path} within {timeout} s")
        if not chunk:
            raise RpcError("the server closed the connection without an answer")
        buf += chunk.decode(errors="replace")
        try:
            resp, _ = dec.raw_decode(buf.lstrip())
            break
        except ValueError:
            continue
    s.close()
    if "error" in resp:
        err = resp["error"]
        raise RpcError(f"{err.get('message', 'error')} (code {err.get('code')})")
    return resp.get("result")


def main(argv=None):
    p = argparse.ArgumentParser(prog="rpc.py", description="iscsi-tgt JSON-RPC client")
    p.add_argument("-s", "--server", default=DEFAULT_SOCK, help="RPC socket path")
    p.add_argument("-t", "--timeout", type=float, default=60.0)
    p.add_argument("command")
    p.add_argument("args", nargs="*")
    a = p.parse_args(argv)
    c, args = a.command, a.args
    try:
        if c == "ls":
            for e in call(a.server, "ls", {"path": args[0] if args else ""}, a.timeout):
                suffix = "/" if e["kind"] == "dir" else ""
                mark = " [key]" if e.get("key") else ""
                print(f"{e['name']}{suffix}{mark}")
        elif c == "get" and len(args) == 1:
            v = call(a.server, "get", {"path": args[0]}, a.timeout)
            print(v, end="" if v.endswith("\n") else "\n")
        elif c == "set" and len(args) == 2:
            call(a.server, "set", {"path": args[0], "value": args[1]}, a.timeout)
        elif c == "mgmt" and len(args) == 2:
            call(a.server, "mgmt", {"path": args[0], "command": args[1]}, a.timeout)
        elif c == "tree":
            print(json.dumps(call(a.server, "tree", {"path": args[0] if args else ""}, a.timeout), indent=2))
        elif c == "save_config":
            print(json.dumps(call(a.server, "save_config", None, a.timeout), indent=2))
        elif c == "load_config" and len(args) == 1:
            text = sys.stdin.read() if args[0] == "-" else open(args[0]).read()
            call(a.server, "load_config", {"config": json.loads(text)}, a.timeout)
        elif c == "rpc_get_methods":
            print("\n".join(call(a.server, "rpc_get_methods", None, a.timeout)))
        elif c == "call" and args:
            params = json.loads(args[1]) if len(args) > 1 else None
            print(json.dumps(call(a.server, args[0], params, a.timeout), indent=2))
        else:
            p.print_usage(sys.stderr)
            print(f"rpc.py: bad arguments for {c!r}", file=sys.stderr)
            return 2
    except RpcError as e:
        print(f"rpc.py: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"rpc.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
