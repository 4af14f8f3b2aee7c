#!/usr/bin/env python3
"""Guest end-to-end scenarios: each starts `remapblk serve` on a fresh image, boots the test
guest with run-guest.sh, drives QEMU over QMP where the scenario needs it, and checks the host
side (the image file, both processes alive). Prints one summary line per scenario.

    scenarios.py [--bin PATH] [--only NAME ...] [--keep]

Exit status 0 when every scenario passed. A failure prints the tail of the guest console and
of remapblk's log.
"""

import argparse
import hashlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MIB = 1 << 20


class ScenarioError(Exception):
    pass


def deadline_loop(what, timeout, poll=0.05):
    """Yields until the caller breaks; raises ScenarioError when `timeout` passes."""
    end = time.monotonic() + timeout
    while True:
        yield
        if time.monotonic() > end:
            raise ScenarioError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


class Remapblk:
    def __init__(self, binary, workdir, image, socket_path, extra, name="remapblk"):
        self.binary = binary
        self.name = name
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.args = [binary, "serve", "--image", image, "--socket", socket_path] + extra
        self.socket = socket_path
        self.proc = None

    def start(self):
        seen = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        for _ in deadline_loop("remapblk to listen", 20):
            if self.proc.poll() is not None:
                raise ScenarioError(f"remapblk exited with {self.proc.returncode} at start")
            with open(self.log_path, "rb") as f:
                f.seek(seen)
                if b"listening on" in f.read():
                    return

    def stop(self, sig=signal.SIGTERM, timeout=15):
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise ScenarioError(f"remapblk did not exit within {timeout}s of signal {sig}")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n=40):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return "(no log)"


class Guest:
    """run-guest.sh in the background, its console lines collected by a reader thread."""

    def __init__(self, socket_path, workdir, script, args="", num_queues=1, qmp=None,
                 reconnect=False, allow_reset=False, timeout=300, incoming=None, name="console",
                 cpu=None):
        self.name = name
        cmd = [os.path.join(HERE, "run-guest.sh"), "--socket", socket_path, "--script", script,
               "--num-queues", str(num_queues), "--timeout", str(timeout),
               "--log", os.path.join(workdir, f"{name}.log")]
        if args:
            cmd += ["--args", args]
        if qmp:
            cmd += ["--qmp", qmp]
        if reconnect:
            cmd += ["--reconnect"]
        if allow_reset:
            cmd += ["--allow-reset"]
        if incoming:
            cmd += ["--incoming", incoming]
        env = dict(os.environ, REMAPBLK_GUEST_CPU=cpu) if cpu else None
        # A session of its own, so that kill() ends QEMU too, not only run-guest.sh.
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.lines = []
        self.queue = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            self.lines.append(line)
            self.queue.put(line)
        self.queue.put(None)

    def expect(self, needle, timeout):
        """Waits for a console line containing `needle`; fails if the guest ends first."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise ScenarioError(f"guest did not print '{needle}' within {timeout}s")
            try:
                line = self.queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise ScenarioError(f"guest ended before printing '{needle}'")
            if "REMAPBLK-GUEST-RESULT: fail" in line:
                raise ScenarioError(f"guest failed: {line}")
            if needle in line:
                return line

    def send(self, text):
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def wait(self, timeout):
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise ScenarioError(f"QEMU still running after {timeout}s")
        # The console's last lines are in once the reader has seen end of file.
        self.reader.join(10)
        return rc

    def alive(self):
        return self.proc.poll() is None

    def settle(self, timeout=5):
        """After a failure: if QEMU is ending anyway, lets run-guest.sh print its verdict (the
        exit status, 128 + signal for a crash) before the console's tail is shown. Returns
        run-guest.sh's exit status, or None while QEMU still runs."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self.reader.join(timeout)
        return rc

    def kill(self):
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def tail(self, n=40):
        return "\n".join(self.lines[-n:])


class Qmp:
    def __init__(self, path, timeout=30):
        for _ in deadline_loop("the QMP socket", timeout):
            if os.path.exists(path):
                try:
                    self.sock = socket.socket(socket.AF_UNIX)
                    self.sock.connect(path)
                    break
                except OSError:
                    self.sock.close()
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rwb")
        self.events = []
        self._recv()  # greeting
        self.cmd("qmp_capabilities")

    def _recv(self):
        line = self.file.readline()
        if not line:
            raise ScenarioError("QMP connection closed")
        return json.loads(line)

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            r = self._recv()
            if "event" in r:
                self.events.append(r)
            elif "error" in r:
                raise ScenarioError(f"QMP {name} failed: {r['error'].get('desc')}")
            elif "return" in r:
                return r["return"]

    def wait_event(self, name, timeout, **data):
        """Waits for event `name` whose data has the given fields; consumes it and every
        event before it."""
        end = time.monotonic() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e["event"] == name and all(e.get("data", {}).get(k) == v for k, v in data.items()):
                    del self.events[: i + 1]
                    return e
            left = end - time.monotonic()
            if left <= 0:
                raise ScenarioError(f"no QMP event {name} within {timeout}s")
            self.sock.settimeout(left)
            try:
                self.events.append(self._recv())
            except socket.timeout:
                pass


def md5_of(path, offset, length):
    h = hashlib.md5()
    with open(path, "rb") as f:
        f.seek(offset)
        h.update(f.read(length))
    return h.hexdigest()


def is_hole(path, offset, length):
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:
            return True  # ENXIO: no data after offset
        return data >= offset + length
    finally:
        os.close(fd)


class Ctx:
    def __init__(self, binary, workdir, size=64 * MIB):
        self.workdir = workdir
        self.binary = binary
        self.image = os.path.join(workdir, "disk.img")
        with open(self.image, "wb") as f:
            f.truncate(size)
        self.socket = os.path.join(workdir, "disk.sock")
        self.qmp_path = os.path.join(workdir, "qmp.sock")
        self.server = None
        self.guest = None
        # Further QEMUs and remapblks of a scenario (migration): cleaned up, shown on failure.
        self.others = []

    def start_server(self, *extra):
        self.server = Remapblk(self.binary, self.workdir, self.image, self.socket, list(extra))
        self.server.start()

    def boot(self, script, **kw):
        self.guest = Guest(self.socket, self.workdir, script, **kw)
        return self.guest

    def finish_guest(self, timeout=120):
        rc = self.guest.wait(timeout)
        if not any("REMAPBLK-GUEST-RESULT: ok" in l for l in self.guest.lines):
            raise ScenarioError(f"guest did not report success (run-guest.sh exit {rc})")
        if rc != 0:
            raise ScenarioError(f"run-guest.sh exited {rc}")

    def cleanup(self):
        for p in [self.guest, *self.others]:
            if isinstance(p, Guest):
                p.kill()
        for p in [self.server, *self.others]:
            if isinstance(p, Remapblk):
                p.stop(signal.SIGKILL)


def scenario_verify(ctx):
    serial = "remapblk-e2e"
    ctx.start_server("--num-queues", "2", "--serial", serial)
    g = ctx.boot("verify", num_queues=2,
                 args=f"bytes={64 * MIB},bs=512,queues=2,serial={serial},off=4,len=16")
    line = g.expect("DATA-MD5", 120)
    ctx.finish_guest()
    want = line.split()[-1]
    got = md5_of(ctx.image, 4 * MIB, 16 * MIB)
    if got != want:
        raise ScenarioError(f"image holds md5 {got} where the guest wrote {want}")
    if ctx.server.stop() != 0:
        raise ScenarioError("remapblk did not exit 0 on SIGTERM")


def scenario_flush_discard(ctx):
    ctx.start_server()
    g = ctx.boot("flush-discard", args="off=8")
    line = g.expect("WT-MD5", 120)
    ctx.finish_guest()
    if md5_of(ctx.image, 13 * MIB, MIB) != line.split()[-1]:
        raise ScenarioError("writethrough data is not in the image")
    for mib in (9, 11):  # the discard and the write-zeroes with UNMAP
        if not is_hole(ctx.image, mib * MIB, MIB):
            raise ScenarioError(f"the host sees no hole at MiB {mib} after discard/unmap")
    with open(ctx.image, "rb") as f:
        f.seek(10 * MIB)
        if f.read(MIB) != bytes(MIB):
            raise ScenarioError("write-zeroes range is not zero in the image")


def scenario_readonly(ctx):
    with open(ctx.image, "r+b") as f:
        f.write(b"\x5a" * MIB)
    before = md5_of(ctx.image, 0, 4 * MIB)
    ctx.start_server("--readonly")
    ctx.boot("readonly")
    ctx.finish_guest()
    if md5_of(ctx.image, 0, 4 * MIB) != before:
        raise ScenarioError("the read-only image changed")


def scenario_hot_unplug(ctx, cycles=10, queues=2):
    ctx.start_server("--num-queues", str(queues))
    # At device_add QEMU re-sends SET_OWNER on the connection it kept open; remapblk starts a
    # fresh session on it (no reconnect option needed).
    g = ctx.boot("hot-unplug-under-io", args=f"cycles={cycles}", num_queues=queues,
                 qmp=ctx.qmp_path, timeout=900)
    qmp = Qmp(ctx.qmp_path)
    for i in range(1, cycles + 1):
        g.expect(f"IO-RUNNING {i}", 180)
        qmp.cmd("device_del", id="disk0")
        qmp.wait_event("DEVICE_DELETED", 60, device="disk0")
        if not ctx.server.alive():
            raise ScenarioError(f"remapblk died in cycle {i}")
        g.expect(f"UNPLUGGED {i}", 60)
        qmp.cmd("device_add", driver="vhost-user-blk-pci", chardev="c0", id="disk0",
                **{"num-queues": queues})
        g.expect(f"REPLUGGED-OK {i}", 120)
        if not g.alive() or not ctx.server.alive():
            raise ScenarioError(f"QEMU or remapblk died in cycle {i}")
    ctx.finish_guest()


class Ctl:
    """One connection to remapblk's control socket, reused for many commands."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(60)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")

    def call(self, command, **args):
        """Runs `command` with `args` (a command's own argument may be called `name`)."""
        self.file.write(json.dumps({"execute": command, "arguments": args}).encode() + b"\n")
        self.file.flush()
        line = self.file.readline()
        if not line:
            raise ScenarioError(f"control socket closed during {command}")
        r = json.loads(line)
        if "error" in r:
            raise ScenarioError(f"{command} {args} failed: {r['error'].get('desc')}")
        return r["return"]

    def close(self):
        self.sock.close()


def scenario_hot_unplug_remaps(ctx, cycles=10, queues=2, remaps=1000, seed=None):
    """hot-unplug-under-io over 1,000 remaps and a write fault, with remap-add/remap-remove
    churning from the host through every unplug and re-plug."""
    import random
    seed = int(os.environ.get("REMAPBLK_SEED", "6005")) if seed is None else seed
    rng = random.Random(seed)
    # What the guest writes: its known data at [0, 4) MiB and four writers' 1 MiB at 8, 16,
    # 24 and 32 MiB. Remaps, the fault and the churn all land there.
    areas = [(0, 4 * MIB)] + [(k * 8 * MIB, MIB) for k in (1, 2, 3, 4)]
    blocks = [(off // 512, size // 512) for off, size in areas]
    fault_lba, fault_count = 2048, 64  # inside the known data, rewritten every cycle
    ctx.start_server("--num-queues", str(queues), "--spare-blocks", "16384")
    ctl = Ctl(ctx.socket + ".ctl")
    done = set()
    while len(done) < remaps:
        first, n = rng.choice(blocks)
        count = min(rng.randint(1, 8), remaps - len(done))
        lba = rng.randrange(first, first + n - count)
        if fault_lba - count < lba < fault_lba + fault_count or done & set(range(lba, lba + count)):
            continue
        ctl.call("remap-add", lba=lba, count=count)
        done.update(range(lba, lba + count))
    ctl.call("fault-add", op="write", lba=fault_lba, count=fault_count)

    stop = threading.Event()
    churn_err = []
    churned = [0]

    def churn():
        c = Ctl(ctx.socket + ".ctl")
        r = random.Random(seed + 1)
        try:
            while not stop.is_set():
                first, n = r.choice(blocks)
                count = r.randint(1, 16)
                lba = r.randrange(first, first + n - count)
                if lba < fault_lba + fault_count and fault_lba < lba + count:
                    continue
                c.call("remap-add", lba=lba, count=count)
                c.call("remap-remove", lba=lba, count=count)
                churned[0] += 1
                if churned[0] % 8 == 0:
                    # The faulty blocks were remapped by the guest's writes; move them back
                    # (without the fault: their data must be copied) so the next cycle's
                    # writes remap them again.
                    c.call("fault-clear")
                    c.call("remap-remove", lba=fault_lba, count=fault_count)
                    c.call("fault-add", op="write", lba=fault_lba, count=fault_count)
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            churn_err.append(e)
        finally:
            c.close()

    t = threading.Thread(target=churn, daemon=True)
    g = ctx.boot("hot-unplug-under-io", args=f"cycles={cycles}", num_queues=queues,
                 qmp=ctx.qmp_path, timeout=600)
    qmp = Qmp(ctx.qmp_path)
    t.start()
    try:
        for i in range(1, cycles + 1):
            g.expect(f"IO-RUNNING {i}", 120)
            qmp.cmd("device_del", id="disk0")
            qmp.wait_event("DEVICE_DELETED", 60, device="disk0")
            if not ctx.server.alive():
                raise ScenarioError(f"remapblk died in cycle {i}")
            g.expect(f"UNPLUGGED {i}", 60)
            qmp.cmd("device_add", driver="vhost-user-blk-pci", chardev="c0", id="disk0",
                    **{"num-queues": queues})
            g.expect(f"REPLUGGED-OK {i}", 120)
            if churn_err:
                raise ScenarioError(f"remap churn failed in cycle {i}: {churn_err[0]}")
            if not g.alive() or not ctx.server.alive():
                raise ScenarioError(f"QEMU or remapblk died in cycle {i}")
        ctx.finish_guest()
    finally:
        stop.set()
        t.join(60)
    if churn_err:
        raise ScenarioError(f"remap churn failed: {churn_err[0]}")
    if churned[0] < cycles:
        raise ScenarioError(f"only {churned[0]} churn rounds in {cycles} cycles")
    for _ in deadline_loop("nothing in flight after the guest shut down", 15):
        st = ctl.call("query-status")
        if st["inflight"] == 0 and not st["connected"]:
            break
    if st["spare_free"] + st["remaps"] != st["spare_total"]:
        raise ScenarioError(f"spare blocks leaked: {st}")
    stats = ctl.call("query-stats")
    if stats["totals"]["abandoned"] != 0:
        raise ScenarioError(f"a drain gave up on requests: {stats['totals']}")
    ctl.close()
    if ctx.server.stop() != 0:
        raise ScenarioError("remapblk did not exit 0 on SIGTERM")


def scenario_reset(ctx):
    ctx.start_server()
    g = ctx.boot("reset", qmp=ctx.qmp_path, allow_reset=True)
    qmp = Qmp(ctx.qmp_path)
    g.expect("IO-RUNNING", 120)
    qmp.cmd("system_reset")
    g.expect("SECOND-BOOT-OK", 120)
    ctx.finish_guest()
    if not ctx.server.alive():
        raise ScenarioError("remapblk died across the reset")


def scenario_backend_restart(ctx):
    ctx.start_server()
    g = ctx.boot("backend-restart", reconnect=True)
    for rnd, sig in ((1, signal.SIGTERM), (2, signal.SIGKILL)):
        g.expect(f"IDLE {rnd}", 120)
        rc = ctx.server.stop(sig)
        if sig == signal.SIGTERM and rc != 0:
            raise ScenarioError(f"remapblk exited {rc} on SIGTERM")
        ctx.server.start()
        g.send("go\n")
        g.expect(f"ROUND-OK {rnd}", 120)
    ctx.finish_guest()


def scenario_read_fault(ctx, sector=4096):
    faults = os.path.join(ctx.workdir, "faults.json")
    events = os.path.join(ctx.workdir, "events.jsonl")
    with open(faults, "w") as f:
        json.dump([{"op": "read", "lba": sector, "mode": "error"}], f)
    ctx.start_server("--faults", faults, "--event-log", events)
    ctx.boot("read-fault", args=f"sector={sector}")
    ctx.finish_guest()
    with open(events) as f:
        fired = [json.loads(l) for l in f if '"fault-fired"' in l]
    if not any(e["first_block"] <= sector <= e["last_block"] for e in fired):
        raise ScenarioError("the event log shows no fault firing on the faulty sector")


def scenario_remap(ctx, off_mib=4):
    faults = os.path.join(ctx.workdir, "faults.json")
    lba = off_mib * 2048 + 100
    with open(faults, "w") as f:
        json.dump([{"op": "write", "lba": lba, "count": 8}], f)
    ctx.start_server("--faults", faults)
    g = ctx.boot("remap", args=f"off={off_mib}", reconnect=True)
    g.expect("WRITTEN", 120)
    out = subprocess.run([ctx.binary, "ctl", "--control", ctx.socket + ".ctl", "remap-list"],
                         capture_output=True, text=True, check=True)
    remapped = sorted(e["lba"] for e in json.loads(out.stdout))
    if remapped != list(range(lba, lba + 8)):
        raise ScenarioError(f"expected blocks {lba}..{lba + 7} remapped, remap-list says {remapped}")
    if ctx.server.stop() != 0:
        raise ScenarioError("remapblk did not exit 0 on SIGTERM")
    ctx.server.args = [a for a in ctx.server.args if a not in ("--faults", faults)]
    ctx.server.start()
    g.send("go\n")
    g.expect("READ-BACK-OK", 120)
    ctx.finish_guest()


def scenario_overlay(ctx, off_mib=4):
    """serve --overlay: a guest's writes never reach the image; after overlay-reset the next
    boot reads the image's data again; after overlay-commit the image holds the guest's."""
    with open(ctx.image, "r+b") as f:
        f.seek(off_mib * MIB)
        f.write(os.urandom(MIB))
    size = os.path.getsize(ctx.image)
    before = md5_of(ctx.image, 0, size)
    base = md5_of(ctx.image, off_mib * MIB, MIB)
    ctx.start_server("--overlay", os.path.join(ctx.workdir, "overlay"))

    def boot(mode, marker):
        g = ctx.boot("overlay", args=f"off={off_mib},mode={mode}")
        line = g.expect(marker, 120)
        ctx.finish_guest()
        return line.split()[-1]

    def ctl(name):
        subprocess.run([ctx.binary, "ctl", "--control", ctx.socket + ".ctl", name],
                       capture_output=True, text=True, check=True)

    boot("write", "WRITTEN")
    if md5_of(ctx.image, 0, size) != before:
        raise ScenarioError("the guest's write reached the image under --overlay")
    ctl("overlay-reset")
    if md5_of(ctx.image, 0, size) != before:
        raise ScenarioError("overlay-reset changed the image")
    if boot("read", "READ") != base:
        raise ScenarioError("the guest booted after overlay-reset does not read the image's data")
    written = boot("write", "WRITTEN")
    ctl("overlay-commit")
    if md5_of(ctx.image, off_mib * MIB, MIB) != written:
        raise ScenarioError("overlay-commit did not put the guest's data into the image")
    if ctx.server.stop() != 0:
        raise ScenarioError("remapblk did not exit 0 on SIGTERM")


def no_io_errors(*guests):
    """The guest kernel logged no I/O error on the console (it prints them at loglevel 4)."""
    for g in guests:
        errs = [l for l in g.lines if "I/O error" in l]
        if errs:
            raise ScenarioError(f"the guest kernel logged I/O errors: {errs[0]}")


def check_writer_md5s(ctx, guest):
    """The guest's WRITER-MD5 K OFF MD5 lines against the image: each writer's last round."""
    lines = [l.split() for l in guest.lines if l.startswith("WRITER-MD5 ")]
    if not lines:
        raise ScenarioError("the guest printed no WRITER-MD5 line")
    for _, k, off, want in lines:
        got = md5_of(ctx.image, int(off) * MIB, MIB)
        if got != want:
            raise ScenarioError(f"writer {k}: the image holds md5 {got} at MiB {off}, the guest wrote {want}")


def scenario_reconnect_under_io(ctx, kills=5, queues=2):
    """remapblk SIGKILLed and restarted under four writers on two queues, QEMU reconnecting
    (reconnect=1) each time. A 100 ms delay fault on a 4 KiB piece of each writer's region
    keeps requests in remapblk for a while; the host kills only once query-status shows one in
    flight, so every restart has requests to resubmit from the inflight region."""
    offs = (8, 16, 24, 32)  # the writers' MiB (guest/scenarios/reconnect-under-io.sh)
    faults = os.path.join(ctx.workdir, "faults.json")
    with open(faults, "w") as f:
        json.dump([{"op": "any", "lba": off * 2048 + 512, "count": 8, "mode": "delay",
                    "delay_ms": 100} for off in offs], f)
    ctx.start_server("--num-queues", str(queues), "--faults", faults)
    g = ctx.boot("reconnect-under-io", args=f"kills={kills}", num_queues=queues,
                 reconnect=True, timeout=600)
    for i in range(1, kills + 1):
        g.expect(f"IO-RUNNING {i}", 120)
        ctl = Ctl(ctx.socket + ".ctl")
        for _ in deadline_loop(f"a request in flight before kill {i}", 30, poll=0.01):
            st = ctl.call("query-status")
            if st["inflight"] > 0:
                break
        ctl.close()
        if not st["inflight_tracking"]:
            raise ScenarioError("query-status: no inflight region in use (inflight_tracking false)")
        ctx.server.stop(signal.SIGKILL)
        ctx.server.start()
        g.send("restarted\n")
        g.expect(f"IO-PROGRESS {i}", 120)
    ctx.finish_guest()
    no_io_errors(g)
    check_writer_md5s(ctx, g)
    if ctx.server.stop() != 0:
        raise ScenarioError("remapblk did not exit 0 on SIGTERM")


# The CPU model of guests that migrate. QEMU 7.2's TCG with `-cpu max` (run-guest.sh's default)
# loses guest state across a migration now and then: the guest crashes on the destination
# (oopses, a segfaulting init, soft lockups) in about a quarter of migrations taken at
# arbitrary moments, with qemu-storage-daemon as the backend as well as with remapblk, and
# with la57, pku or avx/avx2 taken out of `max`; with qemu64, none in 20.
MIGRATION_CPU = "qemu64"


def migration_done(qmp, timeout):
    """Polls query-migrate until the migration completed; fails on failed or cancelled."""
    for _ in deadline_loop("the migration to complete", timeout, poll=0.1):
        m = qmp.cmd("query-migrate")
        if m.get("status") == "completed":
            return m
        if m.get("status") in ("failed", "cancelled"):
            raise ScenarioError(f"migration {m['status']}: {m.get('error-desc', m)}")


def run_state(qmp, timeout):
    """Waits until an incoming QEMU has loaded its guest; resumes it if it came up paused."""
    for _ in deadline_loop("the incoming guest to run", timeout, poll=0.1):
        st = qmp.cmd("query-status")["status"]
        if st == "running":
            return
        if st in ("paused", "postmigrate", "prelaunch"):
            qmp.cmd("cont")
        elif st not in ("inmigrate",):
            raise ScenarioError(f"incoming QEMU is in state {st}")


def remap_entries(ctl):
    return sorted((e["lba"], e["spare_block"], e["cause"]) for e in ctl.call("remap-list"))


def scenario_migrate(ctx):
    """Live migration from remapblk A to remapblk B (serve --incoming, same image and spare)
    with remaps made before and during it, a write fault that auto-remaps during it, and
    guest pages remapblk filled after QEMU had sent them (see guest/scenarios/migrate.sh)."""
    w = ctx.workdir
    ctx.start_server()
    ctl_a = Ctl(ctx.socket + ".ctl")
    ctl_a.call("remap-add", lba=100, count=40, stride=200)  # in the known data, MiB 0-4
    g = ctx.boot("migrate", qmp=ctx.qmp_path, timeout=300, cpu=MIGRATION_CPU)
    qmp = Qmp(ctx.qmp_path)
    g.expect("READY", 120)

    b_sock = os.path.join(w, "disk-b.sock")
    b = Remapblk(ctx.binary, w, ctx.image, b_sock, ["--incoming"], name="remapblk-b")
    ctx.others.append(b)
    b.start()
    mig = os.path.join(w, "mig.sock")
    qmp_b_path = os.path.join(w, "qmp-b.sock")
    dest = Guest(b_sock, w, "migrate", qmp=qmp_b_path, timeout=300, incoming=f"unix:{mig}",
                 name="dest-console", cpu=MIGRATION_CPU)
    ctx.others.append(dest)
    qmp_b = Qmp(qmp_b_path)
    for _ in deadline_loop("the destination's migration socket", 30):
        if os.path.exists(mig):
            break

    # The migration must not end before the host lets it, whatever the guest does (QEMU was
    # seen to find no dirty page at a bitmap sync while the guest ran, and switch over): the
    # first pass over RAM runs at 32 MiB/s with 1 ms of downtime allowed; once it is over
    # (the second bitmap sync) the bandwidth drops to 10 bytes/s, about a page per 100 ms, so
    # the pages dirtied during the first pass stay unsent and QEMU cannot switch over. At the
    # end, a high bandwidth and 2 s of downtime let it switch over at once.
    qmp.cmd("migrate-set-parameters", **{"downtime-limit": 1, "max-bandwidth": 32 * MIB})
    g.send("go\n")
    g.expect("IO-RUNNING", 60)
    qmp.cmd("migrate", uri=f"unix:{mig}")
    for _ in deadline_loop("QEMU to send all of RAM once", 60, poll=0.02):
        m = qmp.cmd("query-migrate")
        if m.get("status") in ("failed", "cancelled", "completed"):
            raise ScenarioError(f"migration {m['status']} during its first pass: {m}")
        if m.get("ram", {}).get("dirty-sync-count", 0) >= 2:
            break
    qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 10})
    m = qmp.cmd("query-migrate")
    if m.get("status") != "active":
        raise ScenarioError(f"the migration was {m.get('status')} right after its first pass")
    # During the migration: remaps over the known data and over writer 2's region (MiB 12),
    # a write fault on writer 1's (MiB 8) that its next round turns into remaps.
    ctl_a.call("remap-add", lba=50, count=10, stride=300)
    ctl_a.call("remap-add", lba=12 * 2048 + 512, count=16, stride=32)
    fault_lba = 8 * 2048 + 1024
    ctl_a.call("fault-add", op="write", lba=fault_lba, count=8, mode="error")
    for _ in deadline_loop("the write fault to auto-remap its blocks", 60, poll=0.1):
        auto = [e for e in remap_entries(ctl_a) if e[2] == "write-error"]
        if [e[0] for e in auto] == list(range(fault_lba, fault_lba + 8)):
            break
    if not ctl_a.call("query-status")["dirty_logging"]:
        raise ScenarioError("query-status on the source: dirty_logging is false during the migration")
    g.send("stop-reading\n")
    g.expect("READ-DONE", 60)
    status = qmp.cmd("query-migrate")["status"]
    if status != "active":
        raise ScenarioError(f"the migration was {status} before the guest's reads were done")
    qmp.cmd("migrate-set-parameters", **{"downtime-limit": 2000, "max-bandwidth": 4096 * MIB})
    m = migration_done(qmp, 60)
    run_state(qmp_b, 30)
    print(f"guest migrate: migration took {m.get('total-time')} ms, downtime {m.get('downtime')} ms",
          flush=True)
    remaps_a = remap_entries(ctl_a)
    # The destination's first request makes B the writer; A, whose rings stopped, must have
    # let go of the files for good (its QEMU still runs, paused, as after any migration).
    ctl_b = Ctl(b_sock + ".ctl")
    for _ in deadline_loop("B to take over the image and spare file", 15, poll=0.1):
        if ctl_b.call("query-status")["handover"]["state"] == "writer":
            break
        st_a = ctl_a.call("query-status")["handover"]
        if st_a["state"] == "writer":
            raise ScenarioError(f"A took the image and spare file back after the migration "
                                f"(handover {st_a}) while B waits for them")
    st_a = ctl_a.call("query-status")["handover"]
    if st_a["state"] == "writer":
        raise ScenarioError(f"A and B both say they are the writer (A: {st_a})")

    # The source QEMU stays (paused, as after any migration) while the guest runs on B.
    dest.send("migrated\n")
    line = dest.expect("POST-MD5", 120)
    rc = dest.wait(120)
    if rc != 0 or not any("REMAPBLK-GUEST-RESULT: ok" in l for l in dest.lines):
        raise ScenarioError(f"the guest did not report success on the destination (exit {rc})")
    qmp.cmd("quit")
    g.wait(30)
    no_io_errors(g, dest)
    # The writers' regions hold remapped blocks, so their data is partly in the spare: the
    # guest verified them through B; the image check is on MiB 28, which has no remaps.
    if md5_of(ctx.image, 28 * MIB, MIB) != line.split()[-1]:
        raise ScenarioError("the image does not hold what the guest wrote on the destination")
    remaps_b = remap_entries(ctl_b)
    if remaps_b != remaps_a:
        raise ScenarioError(f"B's remap table differs from A's: A {len(remaps_a)} entries, "
                            f"B {len(remaps_b)}; only in A {sorted(set(remaps_a) - set(remaps_b))[:5]}, "
                            f"only in B {sorted(set(remaps_b) - set(remaps_a))[:5]}")
    ctl_a.close()
    ctl_b.close()
    for server in (ctx.server, b):
        if not server.alive():
            raise ScenarioError(f"{server.name} died")
        if server.stop() != 0:
            raise ScenarioError(f"{server.name} did not exit 0 on SIGTERM")


def scenario_save_restore(ctx):
    """Save a guest under I/O to a file (migrate to exec:), quit QEMU, restore the file in a
    new QEMU on the same remapblk process."""
    state = os.path.join(ctx.workdir, "vm.state")
    ctx.start_server()
    g = ctx.boot("save-restore", qmp=ctx.qmp_path, timeout=300, cpu=MIGRATION_CPU)
    qmp = Qmp(ctx.qmp_path)
    g.expect("IO-RUNNING", 120)
    qmp.cmd("migrate-set-parameters", **{"downtime-limit": 2000, "max-bandwidth": 4096 * MIB})
    qmp.cmd("migrate", uri=f"exec:cat > {state}")
    migration_done(qmp, 60)
    qmp.cmd("quit")
    g.wait(30)
    if not ctx.server.alive():
        raise ScenarioError("remapblk died when the saved QEMU quit")
    qmp2_path = os.path.join(ctx.workdir, "qmp-restored.sock")
    r = Guest(ctx.socket, ctx.workdir, "save-restore", qmp=qmp2_path, timeout=300,
              incoming=f"exec:cat {state}", name="restored-console", cpu=MIGRATION_CPU)
    ctx.others.append(r)
    run_state(Qmp(qmp2_path), 60)
    r.send("restored\n")
    rc = r.wait(120)
    if rc != 0 or not any("REMAPBLK-GUEST-RESULT: ok" in l for l in r.lines):
        raise ScenarioError(f"the restored guest did not report success (exit {rc})")
    no_io_errors(g, r)
    check_writer_md5s(ctx, r)
    if ctx.server.stop() != 0:
        raise ScenarioError("remapblk did not exit 0 on SIGTERM")


# --- crash lab (cache model, power cut, overlay, write log) -------------------------------

def lab_boot(ctx, timeout=900):
    """Boots the crash-lab guest and waits until it reads its console."""
    g = ctx.boot("crash-lab", timeout=timeout)
    g.expect("CL-READY", 120)
    return g


def lab(g, line, timeout=120, want_rc=0):
    """Sends one step to the crash-lab guest and waits for its CL-DONE line: returns DETAIL."""
    g.send(line + "\n")
    step = line.split()[0]
    done = g.expect(f"CL-DONE {step} ", timeout)
    parts = done.split("CL-DONE ", 1)[1].split()
    rc, detail = int(parts[1]), " ".join(parts[2:])
    if want_rc is not None and rc != want_rc:
        raise ScenarioError(f"guest step '{line}' ended {rc} ({detail}), not {want_rc}")
    return detail


def mkfs_host(image, fstype):
    # 4 KiB blocks: a file system block is then one logical block of a --block-size 4096 disk.
    subprocess.run(["mke2fs", "-F", "-q", "-t", fstype, "-b", "4096", "-E",
                    "lazy_itable_init=0,lazy_journal_init=0", image], check=True,
                   stdout=subprocess.DEVNULL)


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def wait_unflushed(ctl, at_least, timeout):
    """Polls query-status until the volatile cache holds at least `at_least` unflushed bytes."""
    for _ in deadline_loop(f"{at_least} unflushed bytes", timeout):
        if ctl.call("query-status").get("unflushed_bytes", 0) >= at_least:
            return


def cut_counts(reply):
    """power-cut's reply in brief: how many unflushed writes it lost, kept and tore."""
    c = reply["counts"]
    return {k: c[k] for k in ("lost", "kept", "torn")}


def lab_seed(ctx, g, ctl, fstype, seed):
    """One turn of the lab loop on a reset disk: mount, run a file workload, cut power at a
    random subset of the unflushed writes (torn by sector), let the disk fail the guest's
    writes while it lets go of the file system, power on, and check the file system as the
    next boot would find it. Returns e2fsck's exit status."""
    ctl.call("overlay-reset")
    lab(g, "forget")
    lab(g, f"mount {fstype}")
    lab(g, "churn-start")
    wait_unflushed(ctl, 256 * 1024, 60)
    cut = ctl.call("power-cut", mode="random", seed=seed, probability=0.5, torn="sector",
                   then="fail")
    lab(g, "churn-stop")
    lab(g, "umount", want_rc=None)
    lab(g, "forget")
    ctl.call("power-on")
    if fstype == "ext4":
        # Mounting replays the journal, as the next boot would.
        lab(g, "mount ext4")
        lab(g, "umount")
        lab(g, "forget")
    rc = int(lab(g, "fsck", timeout=180))
    print(f"  {fstype} seed {seed}: {cut_counts(cut)} -> e2fsck -fn exit {rc}", flush=True)
    return rc


def scenario_power_cut_ext4(ctx, seeds=20):
    """ext4 on the volatile cache: an fsynced file survives a drop-all power cut and a VM
    restart (the journal replays, e2fsck -fn is clean), a file written but not flushed does
    not; then 20 random, torn power cuts in the lab loop (overlay reset between them) leave a
    clean file system every time; a commit makes the overlay the image."""
    mkfs_host(ctx.image, "ext4")
    base = sha256_of(ctx.image)
    overlay = os.path.join(ctx.workdir, "overlay.img")
    # A disk of 4 KiB sectors (as most are now): a torn write loses whole 4 KiB blocks. On
    # 512-byte sectors a cut can tear ext4's 1 KiB superblock between its two sectors, and the
    # next mount refuses its checksum: damage the lab rightly finds, but not what this
    # scenario is about.
    ctx.start_server("--cache-model", "volatile", "--overlay", overlay, "--block-size", "4096")
    ctl = Ctl(ctx.server.socket + ".ctl")
    g = lab_boot(ctx)
    lab(g, "setup")
    lab(g, "mount ext4 commit=60")
    a = lab(g, "write-sync A 256")
    b = lab(g, "write-nosync B 256")
    cut = ctl.call("power-cut", mode="drop-all")
    if cut_counts(cut)["lost"] == 0:
        raise ScenarioError(f"power-cut drop-all lost nothing after an unflushed write: {cut}")
    g.kill()  # the VM loses power with its disk
    ctl.call("power-on")

    g = lab_boot(ctx)
    lab(g, "setup")
    lab(g, "mount ext4")
    if lab(g, "md5 A") != a:
        raise ScenarioError("the fsynced file A is not intact after the power cut")
    if lab(g, "md5 B") == b:
        raise ScenarioError("file B, written but never flushed, survived a drop-all power cut")
    lab(g, "umount")
    lab(g, "forget")
    if lab(g, "fsck") != "0":
        raise ScenarioError("e2fsck -fn found errors after the drop-all power cut")

    ctl.call("overlay-reset")
    lab(g, "forget")
    if lab(g, "devsum") != md5_of(ctx.image, 0, os.path.getsize(ctx.image)):
        raise ScenarioError("after overlay-reset the disk does not read as the base image")
    bad = [s for s in range(1, seeds + 1) if lab_seed(ctx, g, ctl, "ext4", s) != 0]
    if bad:
        raise ScenarioError(f"ext4 was damaged by the power cuts of seeds {bad}")
    if sha256_of(ctx.image) != base:
        raise ScenarioError("the image changed under --overlay before any commit")

    ctl.call("overlay-reset")
    lab(g, "forget")
    lab(g, "mount ext4")
    c = lab(g, "write-sync C 64")
    lab(g, "umount")
    ctl.call("overlay-commit")
    lab(g, "end")
    ctx.finish_guest()
    if ctx.server.stop() != 0:
        raise ScenarioError("remapblk did not exit 0 on SIGTERM")
    out = os.path.join(ctx.workdir, "C.out")
    subprocess.run(["debugfs", "-R", f"dump /C {out}", ctx.image], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if md5_of(out, 0, os.path.getsize(out)) != c:
        raise ScenarioError("the file written before overlay-commit is not in the image")
    fsck = subprocess.run(["e2fsck", "-fn", ctx.image], capture_output=True, text=True)
    if fsck.returncode != 0:
        raise ScenarioError(f"the committed image is not clean: {fsck.stdout[-500:]}")


def scenario_power_cut_ext2(ctx, seeds=20):
    """The same lab loop on ext2, which has no journal: the lab must find the damage a power
    cut does to it (e2fsck -fn reports errors for at least one of 20 seeds)."""
    mkfs_host(ctx.image, "ext2")
    overlay = os.path.join(ctx.workdir, "overlay.img")
    ctx.start_server("--cache-model", "volatile", "--overlay", overlay)
    ctl = Ctl(ctx.server.socket + ".ctl")
    g = lab_boot(ctx)
    lab(g, "setup")
    for seed in range(1, seeds + 1):
        # Exit status 4: errors left uncorrected (-n), the damage the cut did.
        if lab_seed(ctx, g, ctl, "ext2", seed) & 4:
            break
    else:
        raise ScenarioError(f"no power cut of {seeds} seeds damaged ext2: the lab finds nothing")
    lab(g, "end")
    ctx.finish_guest()


def scenario_write_log(ctx):
    """The guest makes ext4 and works on it while remapblk logs every write: e2fsck -fn is
    clean at every flush of the log, and replaying to each mark gives the disk the guest read
    at that mark."""
    log_path = os.path.join(ctx.workdir, "writes.log")
    base = os.path.join(ctx.workdir, "base.img")
    shutil.copyfile(ctx.image, base)
    ctx.start_server("--write-log", log_path)
    ctl = Ctl(ctx.server.socket + ".ctl")
    g = lab_boot(ctx, timeout=600)
    lab(g, "setup")
    sums = {}
    lab(g, "mkfs ext4")
    lab(g, "sync")

    def mark(name):
        ctl.call("log-mark", name=name)
        sums[name] = lab(g, "devsum")

    mark("mkfs")
    lab(g, "mount ext4")
    lab(g, "write-sync a 512")
    lab(g, "umount")
    mark("file-a")
    lab(g, "mount ext4")
    lab(g, "churn-start")
    start = ctl.call("query-status")["write_log"]["entries"]
    for _ in deadline_loop("the workload's writes in the log", 60):
        if ctl.call("query-status")["write_log"]["entries"] >= start + 500:
            break
    lab(g, "churn-stop")
    lab(g, "umount")
    mark("churn")
    lab(g, "end")
    ctx.finish_guest()
    if ctx.server.stop() != 0:
        raise ScenarioError("remapblk did not exit 0 on SIGTERM")
    for name, want in sums.items():
        copy = os.path.join(ctx.workdir, f"at-{name}.img")
        shutil.copyfile(base, copy)
        subprocess.run([ctx.binary, "log", "replay", log_path, "--image", copy, "--to-mark", name],
                       check=True, stdout=subprocess.DEVNULL)
        got = md5_of(copy, 0, os.path.getsize(copy))
        if got != want:
            raise ScenarioError(f"replaying to mark {name} gives md5 {got}, the guest read {want}")
        os.unlink(copy)
    # e2fsck -n skips the journal's recovery, and at a flush of a mounted ext4 the journal
    # holds metadata not yet written in place: the check replays it on a throwaway copy of the
    # point first, as the next mount would (e2fsck -E journal_only), then checks that copy.
    fsck = os.path.join(ctx.workdir, "fsck-after-journal.sh")
    with open(fsck, "w") as f:
        f.write('set -e\nt="$1.fsck"\ncp --sparse=always "$1" "$t"\n'
                'e2fsck -E journal_only -y "$t" >/dev/null 2>&1 || true\n'
                'rc=0; e2fsck -fn "$t" || rc=$?\nrm -f "$t"\nexit $rc\n')
    # From the mark after mkfs: at the flushes mke2fs makes along the way there is no file
    # system yet to check.
    r = subprocess.run([ctx.binary, "log", "check", log_path, "--base", base, "--each", "flush",
                        "--from-mark", "mkfs", "--", "sh", fsck, "{}"],
                       capture_output=True, text=True)
    points = [l for l in r.stdout.splitlines() if l.startswith("{")]
    if r.returncode != 0:
        raise ScenarioError(f"log check --each flush failed: {(r.stdout + r.stderr)[-1500:]}")
    if len(points) < 10:
        raise ScenarioError(f"log check checked only {len(points)} flush points: {r.stdout[-500:]}")


def pattern(tag, length):
    """What the crash-lab guest's fill step writes: "TAG\\n" repeated, cut to `length`."""
    unit = (tag + "\n").encode()
    return (unit * (length // len(unit) + 1))[:length]


def image_bytes(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def scenario_fault_data(ctx, sector=8192, kib=64):
    """Faults that damage data without an error: with corrupt on reads the guest's cmp fails
    while the image stays intact (and reads clean once the fault is gone); a lost write
    completes OK in the guest, which reads stale data once its page cache is dropped."""
    ctx.start_server()
    ctl = Ctl(ctx.server.socket + ".ctl")
    g = lab_boot(ctx)
    at, n = sector * 512, kib * 1024
    alpha, bravo = pattern("alpha", n), pattern("bravo", n)
    lab(g, f"fill {sector} {kib} alpha")
    if image_bytes(ctx.image, at, n) != alpha:
        raise ScenarioError("the guest's write did not reach the image")

    fid = ctl.call("fault-add", op="read", lba=sector + 16, count=8, mode="corrupt",
                   bits=3, seed=7)["id"]
    got = lab(g, f"cmp {sector} {kib} alpha").split()
    if got[0] != "differ":
        raise ScenarioError("the guest read the blocks under a corrupt fault back intact")
    if image_bytes(ctx.image, at, n) != alpha:
        raise ScenarioError("a corrupt fault on reads changed the image")
    ctl.call("fault-remove", id=fid)
    if lab(g, f"cmp {sector} {kib} alpha").split()[0] != "same":
        raise ScenarioError("the blocks still read corrupted after the fault was removed")

    lost = 32
    ctl.call("fault-add", op="write", lba=sector + lost, count=8, mode="lost-write")
    lab(g, f"fill {sector} {kib} bravo")  # completes OK: the guest is told nothing
    want = bravo[: lost * 512] + alpha[lost * 512: (lost + 8) * 512] + bravo[(lost + 8) * 512:]
    got = lab(g, f"cmp {sector} {kib} bravo").split()
    if got[0] != "differ" or got[1] != hashlib.md5(want).hexdigest():
        raise ScenarioError(f"after a lost write the guest read {got}, not bravo with the "
                            "lost blocks stale (alpha)")
    if image_bytes(ctx.image, at, n) != want:
        raise ScenarioError("the image does not hold bravo with the lost blocks' old data")
    fired = ctl.call("query-stats")["faults_fired"]
    if fired.get("corrupt", 0) < 1 or fired.get("lost-write", 0) < 1:
        raise ScenarioError(f"query-stats faults_fired does not count the firings: {fired}")
    lab(g, "end")
    ctx.finish_guest()


SCENARIOS = [
    ("verify", scenario_verify),
    ("flush-discard", scenario_flush_discard),
    ("readonly", scenario_readonly),
    ("hot-unplug-under-io", scenario_hot_unplug),
    ("hot-unplug-remaps", scenario_hot_unplug_remaps),
    ("reset", scenario_reset),
    ("backend-restart", scenario_backend_restart),
    ("read-fault", scenario_read_fault),
    ("fault-data", scenario_fault_data),
    ("remap", scenario_remap),
    ("overlay", scenario_overlay),
    ("reconnect-under-io", scenario_reconnect_under_io),
    ("migrate", scenario_migrate),
    ("save-restore", scenario_save_restore),
    ("power-cut-ext4", scenario_power_cut_ext4),
    ("power-cut-ext2", scenario_power_cut_ext2),
    ("write-log", scenario_write_log),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "remapblk"),
                    help="remapblk binary (default: target/release/remapblk)")
    ap.add_argument("--only", nargs="*", help="run only these scenarios")
    ap.add_argument("--keep", action="store_true", help="keep the work directories")
    opts = ap.parse_args()
    if not os.access(opts.bin, os.X_OK):
        print(f"scenarios: {opts.bin} is missing; run cargo build --release", file=sys.stderr)
        return 2
    subprocess.run([os.path.join(HERE, "build-guest.sh")], check=True)

    failed = 0
    for name, fn in SCENARIOS:
        if opts.only and name not in opts.only:
            continue
        workdir = tempfile.mkdtemp(prefix=f"remapblk-{name}-")
        ctx = None
        t0 = time.monotonic()
        try:
            ctx = Ctx(opts.bin, workdir)
            fn(ctx)
            print(f"guest {name}: ok ({time.monotonic() - t0:.1f} s)", flush=True)
        except Exception as e:  # noqa: BLE001 - every failure is reported the same way
            failed += 1
            print(f"guest {name}: FAILED ({time.monotonic() - t0:.1f} s): {e}", flush=True)
            if ctx and ctx.guest:
                rc = ctx.guest.settle()
                state = "still running" if rc is None else f"run-guest.sh exited {rc}"
                print(f"--- guest console (last lines; {state}) ---\n{ctx.guest.tail()}")
            if ctx and ctx.server:
                print(f"--- remapblk log (last lines) ---\n{ctx.server.tail()}", flush=True)
            for other in ctx.others if ctx else []:
                if isinstance(other, Guest):
                    rc = other.settle()
                    state = "still running" if rc is None else f"run-guest.sh exited {rc}"
                    print(f"--- {other.name} (last lines; {state}) ---\n{other.tail()}")
                else:
                    print(f"--- {other.name} log (last lines) ---\n{other.tail()}", flush=True)
        finally:
            if ctx:
                ctx.cleanup()
            if not opts.keep:
                shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
