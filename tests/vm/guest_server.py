"""The guest half of the VM harness: run what the host asks, report what happens.

Started by the guest's init (``guest_init.sh``) as ``python -I -S guest_server.py HOST
PORT FIFO`` with the host's interpreter from the 9p share.  Once init writes to FIFO
(the network is up) it connects OUT to the harness,
sends a hello line with the token it reads from fw_cfg, then serves requests until the
host closes the connection, when it kills every process it started and exits (init
then powers the guest off).

Wire format: one JSON object per line, both ways.  Bytes travel base64-encoded.

    host → guest   {"id": N, "op": "spawn", "argv": [...], "env": {..},
                    "cwd": str|null, "stdin": b64|null}
                   {"id": N, "op": "signal", "target": M, "sig": S, "group": bool}
                   {"id": N, "op": "read", "path": str}
                   {"id": N, "op": "write", "path": str, "data": b64, "mode": int}
    guest → host   {"hello": token, "uptime_s": float, "pid": int}
                   {"id": N, "ev": "started", "pid": P}
                   {"id": N, "ev": "out", "fd": 1|2, "data": b64}
                   {"id": N, "ev": "exit", "rc": int}        # -S when killed by signal S
                   {"id": N, "ev": "ok", "data": b64|null}
                   {"id": N, "ev": "error", "error": str}

A spawned process runs in its own session (so the host can signal its whole group)
with SIGPIPE and SIGXFSZ at their defaults.  Its "exit" comes after every byte it
wrote itself; output that orphaned children write after it exited is dropped.

Under TCG the first Python process in a guest pays for translating every code path
it runs, so this file imports as little as it can: no subprocess, selectors, socket,
signal or base64 (each costs ~0.1-0.8 s at boot) — fork/exec, epoll, _socket and
binascii instead.  One thread: the socket, each child's pipes and a pidfd per child
(readable once the child has exited) share one epoll.
"""

import _signal
import _socket
import binascii
import json
import os
import select
import sys

TOKEN_PATH = "/sys/firmware/qemu_fw_cfg/by_name/opt/uballoon-harness/token/raw"
SIGKILL, SIGPIPE, SIGXFSZ = 9, 13, 25
CHUNK = 1 << 16


def uptime_s() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def unb64(text: str) -> bytes:
    return binascii.a2b_base64(text)


def start_process(argv, env, cwd, with_stdin):
    """fork + exec in a new session; returns (pid, stdin_w, stdout_r, stderr_r).

    Raises OSError (with the child's own message) when the exec fails.
    """
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    if with_stdin:
        in_r, in_w = os.pipe()
    else:
        in_r, in_w = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC), -1
    # Closed by a successful exec (O_CLOEXEC); otherwise carries the child's error.
    fail_r, fail_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: nothing here may return
        try:
            os.setsid()
            _signal.signal(SIGPIPE, _signal.SIG_DFL)
            _signal.signal(SIGXFSZ, _signal.SIG_DFL)
            os.dup2(in_r, 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            if cwd:
                os.chdir(cwd)
            os.execvpe(argv[0], argv, env)
        except BaseException as e:
            os.write(fail_w, f"{type(e).__name__}: {e}".encode(errors="replace"))
        finally:
            os._exit(127)
    for fd in (in_r, out_w, err_w, fail_w):
        os.close(fd)
    failure = b""
    while True:
        chunk = os.read(fail_r, 4096)
        if not chunk:
            break
        failure += chunk
    os.close(fail_r)
    if failure:
        os.waitpid(pid, 0)
        for fd in (in_w, out_r, err_r):
            if fd >= 0:
                os.close(fd)
        raise OSError(failure.decode(errors="replace"))
    return pid, in_w, out_r, err_r


class Child:
    """One spawned process: its pipes, its pidfd, and input still to feed it."""

    def __init__(self, req_id, pid, stdin_fd, stdout_fd, stderr_fd, stdin_data):
        self.req_id = req_id
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.stdin_fd = stdin_fd
        self.out_fds = {stdout_fd: 1, stderr_fd: 2}  # still open: fd → stream number
        self.stdin_data = memoryview(stdin_data)


class Server:
    def __init__(self, sock):
        self.sock = sock
        self.ep = select.epoll()
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.children = {}  # request id → Child
        self.fd_owner = {}  # fd → (kind, Child)

    # -- sending ------------------------------------------------------------------

    def send(self, msg):
        self.outbuf += json.dumps(msg, separators=(",", ":")).encode() + b"\n"
        self.flush()

    def flush(self):
        while self.outbuf:
            try:
                n = self.sock.send(self.outbuf)
            except BlockingIOError:
                self.ep.modify(self.sock.fileno(), select.EPOLLIN | select.EPOLLOUT)
                return
            del self.outbuf[:n]
        self.ep.modify(self.sock.fileno(), select.EPOLLIN)

    # -- requests -----------------------------------------------------------------

    def handle(self, req):
        req_id = req["id"]
        op = req["op"]
        try:
            if op == "spawn":
                self.spawn(req)
            elif op == "signal":
                child = self.children.get(req["target"])
                if child is None:
                    raise ProcessLookupError(f"no running command {req['target']}")
                if req.get("group"):
                    os.killpg(child.pid, req["sig"])
                else:
                    os.kill(child.pid, req["sig"])
                self.send({"id": req_id, "ev": "ok", "data": None})
            elif op == "read":
                with open(req["path"], "rb") as f:
                    data = f.read()
                self.send({"id": req_id, "ev": "ok", "data": b64(data)})
            elif op == "write":
                fd = os.open(req["path"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, req["mode"])
                with open(fd, "wb") as f:
                    f.write(unb64(req["data"]))
                os.chmod(req["path"], req["mode"])
                self.send({"id": req_id, "ev": "ok", "data": None})
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as e:  # every failure goes back to the host, which raises it
            self.send({"id": req_id, "ev": "error", "error": f"{type(e).__name__}: {e}"})

    def spawn(self, req):
        stdin = req.get("stdin")
        pid, in_fd, out_fd, err_fd = start_process(
            req["argv"], req["env"], req.get("cwd"), stdin is not None
        )
        child = Child(req["id"], pid, in_fd, out_fd, err_fd, unb64(stdin) if stdin else b"")
        self.children[child.req_id] = child
        self.send({"id": child.req_id, "ev": "started", "pid": pid})
        for fd in child.out_fds:
            os.set_blocking(fd, False)
            self.watch(fd, select.EPOLLIN, "out", child)
        if in_fd >= 0:
            os.set_blocking(in_fd, False)
            self.watch(in_fd, select.EPOLLOUT, "in", child)
        self.watch(child.pidfd, select.EPOLLIN, "exit", child)

    def watch(self, fd, events, kind, child):
        self.ep.register(fd, events)
        self.fd_owner[fd] = (kind, child)

    def unwatch_and_close(self, fd):
        self.ep.unregister(fd)
        del self.fd_owner[fd]
        os.close(fd)

    # -- children -----------------------------------------------------------------

    def read_output(self, child, fd, to_eof):
        while fd in child.out_fds:
            try:
                data = os.read(fd, CHUNK)
            except BlockingIOError:
                return
            if not data:
                del child.out_fds[fd]
                self.unwatch_and_close(fd)
                return
            self.send({"id": child.req_id, "ev": "out", "fd": child.out_fds[fd], "data": b64(data)})
            if not to_eof:
                return

    def write_input(self, child):
        try:
            n = os.write(child.stdin_fd, child.stdin_data[:CHUNK])
            child.stdin_data = child.stdin_data[n:]
        except BlockingIOError:
            return
        except BrokenPipeError:
            child.stdin_data = child.stdin_data[:0]
        if not child.stdin_data:
            self.unwatch_and_close(child.stdin_fd)
            child.stdin_fd = -1

    def reap(self, child):
        _, status = os.waitpid(child.pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        # Everything the process itself wrote is in its pipes now; take it, then stop
        # listening (a surviving grandchild may hold the pipes open forever).
        for fd in list(child.out_fds):
            self.read_output(child, fd, to_eof=True)
            if fd in child.out_fds:
                del child.out_fds[fd]
                self.unwatch_and_close(fd)
        if child.stdin_fd >= 0:
            self.unwatch_and_close(child.stdin_fd)
            child.stdin_fd = -1
        self.unwatch_and_close(child.pidfd)
        del self.children[child.req_id]
        self.send({"id": child.req_id, "ev": "exit", "rc": rc})

    def kill_all(self):
        for child in self.children.values():
            try:
                os.killpg(child.pid, SIGKILL)
            except ProcessLookupError:
                pass

    # -- loop ---------------------------------------------------------------------

    def serve(self):
        self.sock.setblocking(False)
        sock_fd = self.sock.fileno()
        self.ep.register(sock_fd, select.EPOLLIN)
        while True:
            for fd, events in self.ep.poll():
                if fd == sock_fd:
                    if events & select.EPOLLOUT:
                        self.flush()
                    if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                        if not self.read_socket():
                            self.kill_all()
                            return
                    continue
                owner = self.fd_owner.get(fd)
                if owner is None:  # closed earlier in this batch
                    continue
                kind, child = owner
                if kind == "out":
                    self.read_output(child, fd, to_eof=False)
                elif kind == "in":
                    self.write_input(child)
                elif kind == "exit":
                    self.reap(child)

    def read_socket(self):
        try:
            data = self.sock.recv(1 << 20)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        self.inbuf += data
        while True:
            end = self.inbuf.find(b"\n")
            if end < 0:
                return True
            line = bytes(self.inbuf[:end])
            del self.inbuf[: end + 1]
            self.handle(json.loads(line))


def main():
    host, port, net_ready = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    print(f"uballoon-server: started {uptime_s():.2f}s", flush=True)
    with open(net_ready) as f:  # init writes to it once the network is up
        f.read()
    with open(TOKEN_PATH) as f:
        token = f.read().strip()
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    sock.connect((host, port))
    sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
    hello = {"hello": token, "uptime_s": uptime_s(), "pid": os.getpid()}
    sock.sendall(json.dumps(hello).encode() + b"\n")
    Server(sock).serve()


if __name__ == "__main__":
    main()
