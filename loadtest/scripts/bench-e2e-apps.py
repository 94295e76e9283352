"""The apps and the arithmetic of bench-e2e.sh (run by it; Python 3, standard library only).

  servers SINK ECHO          a sink (8-byte big-endian length, that many bytes, one byte back) and
                             an echo server, one thread per connection
  send ADDR BYTES            one connection carries BYTES to the sink; JSON bytes_per_sec
  ping ADDR N WARMUP         64-byte ping-pong against the echo; JSON p50_us, p99_us, ...
  held ADDR N SETTLE PID...  N connections to the echo, each carrying a 16-byte round trip so it
                             is really carried end to end, held together; the summed VmRSS of the
                             PIDs (the tunnel processes) before, while held and SETTLE seconds
                             after all are closed, and each one's growth per connection; JSON
  rss PID...                 the summed VmRSS of the PIDs in KiB
  iperf FILE                 one line from an `iperf3 -J` file: Gbit/s and bytes received
                             (end.sum_received) and the streams' fairness (min/max bytes), or
                             the error iperf3 reported
  summary RESULTS CONFIGS [SETTLE]  summary.md from results.tsv (medians over the rounds)
"""
import json, os, socket, statistics, struct, sys, threading, time


def nodelay(s):
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def recv_exact(s, n):
    out = bytearray()
    while len(out) < n:
        d = s.recv(n - len(out))
        if not d:
            raise EOFError("connection ended")
        out += d
    return bytes(out)


def sink(c):
    n = struct.unpack(">Q", recv_exact(c, 8))[0]
    buf = bytearray(1 << 20)
    mv = memoryview(buf)
    left = n
    while left:
        k = c.recv_into(mv[: min(left, len(buf))])
        if not k:
            return
        left -= k
    c.sendall(b"k")
    c.recv(1)


def echo(c):
    while True:
        d = c.recv(65536)
        if not d:
            return
        c.sendall(d)


def serve(addr, handler):
    host, port = addr.rsplit(":", 1)
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, int(port)))
    # The held-connections test opens BENCH_HELD connections back to back (somaxconn caps it).
    ls.listen(4096)
    while True:
        c, _ = ls.accept()
        nodelay(c)

        def run(c=c):
            try:
                handler(c)
            except (OSError, EOFError):
                pass
            finally:
                c.close()

        threading.Thread(target=run, daemon=True).start()


def connect(addr, timeout=None):
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=timeout)
    nodelay(s)
    return s


def send(addr, n):
    buf = memoryview(os.urandom(1 << 20))
    s = connect(addr)
    t0 = time.perf_counter()
    s.sendall(struct.pack(">Q", n))
    left = n
    while left:
        k = min(left, len(buf))
        s.sendall(buf[:k])
        left -= k
    if s.recv(1) != b"k":
        raise SystemExit("the sink did not confirm")
    dt = time.perf_counter() - t0
    s.close()
    print(json.dumps({"bytes": n, "seconds": dt, "bytes_per_sec": n / dt}))


def ping(addr, n, warmup):
    s = connect(addr)
    msg = os.urandom(64)
    lat = []
    for i in range(warmup + n):
        t0 = time.perf_counter_ns()
        s.sendall(msg)
        got = recv_exact(s, 64)
        t1 = time.perf_counter_ns()
        if got != msg:
            raise SystemExit("echo differs")
        if i >= warmup:
            lat.append(t1 - t0)
    s.close()
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] / 1000.0
    print(json.dumps({"n": n, "p50_us": q(0.50), "p90_us": q(0.90), "p99_us": q(0.99),
                      "mean_us": sum(lat) / len(lat) / 1000.0, "max_us": lat[-1] / 1000.0}))


def rss_kib(pids):
    """Summed VmRSS (KiB) of the PIDs; SystemExit naming the first one that is gone."""
    return sum(rss_each(pids))


def rss_each(pids):
    """VmRSS (KiB) of each of the PIDs."""
    each = []
    for p in pids:
        try:
            status = open(f"/proc/{p}/status").read()
        except OSError:
            raise SystemExit(f"process {p} is gone")
        line = [l for l in status.splitlines() if l.startswith(("VmRSS:", "State:"))]
        if any(l.startswith("State:") and "Z" in l.split()[1] for l in line):
            raise SystemExit(f"process {p} has exited (zombie)")
        each.append(sum(int(l.split()[1]) for l in line if l.startswith("VmRSS:")))
    return each


def held(addr, n, settle, pids):
    before_each = rss_each(pids)
    before = sum(before_each)
    socks = []
    msg = b"held-connection!"  # 16 bytes
    t0 = time.perf_counter()
    try:
        for i in range(n):
            s = connect(addr, timeout=20)
            socks.append(s)
            s.sendall(msg)
            if recv_exact(s, len(msg)) != msg:
                raise SystemExit(f"connection {i}: the echo differs")
    except (OSError, EOFError) as e:
        for s in socks:
            s.close()
        raise SystemExit(f"connection {len(socks)} of {n} failed: {e!r}")
    opened_s = time.perf_counter() - t0
    # Every connection still up after all were opened (none closed by the tunnel meanwhile).
    for i, s in enumerate(socks):
        s.sendall(msg)
    for i, s in enumerate(socks):
        try:
            if recv_exact(s, len(msg)) != msg:
                raise SystemExit(f"held connection {i}: the echo differs")
        except (OSError, EOFError) as e:
            raise SystemExit(f"held connection {i} of {n} broke while held: {e!r}")
    time.sleep(0.5)
    during_each = rss_each(pids)
    during = sum(during_each)
    for s in socks:
        s.close()
    time.sleep(settle)
    after = rss_kib(pids)
    grown = during - before
    print(json.dumps({
        "n": n, "open_seconds": opened_s, "before_kib": before, "during_kib": during,
        "after_kib": after, "kib_per_conn": grown / n,
        "given_back_pct": 100.0 * (during - after) / grown if grown > 0 else float("nan"),
        # Where it grew: KiB per held connection of each process, in the PIDs' order.
        "kib_per_conn_each": ",".join(f"{(d - b) / n:.1f}" for b, d in zip(before_each, during_each)),
    }))


def iperf(path):
    try:
        j = json.load(open(path))
    except (OSError, ValueError) as e:
        print(f"ERROR no JSON from iperf3 ({e})")
        return
    if j.get("error"):
        print("ERROR " + j["error"].replace("\t", " ").replace("\n", " "))
        return
    r = j["end"]["sum_received"]
    # Fairness: the fewest bytes one stream got over the most (1.0 with one stream).
    each = [st["receiver"]["bytes"] for st in j["end"]["streams"]]
    fair = min(each) / max(each) if each and max(each) > 0 else float("nan")
    print(f"{r['bits_per_second'] / 1e9:.4f}\t{int(r['bytes'])}\t{fair:.3f}")


# --- summary.md ---------------------------------------------------------------------------
LABELS = {"direct": "direct", "plain": "iotunnel ws", "tls": "iotunnel wss",
          "rathole": "rathole tcp", "rathole-tls": "rathole tls", "bore": "bore"}


def summary(results, configs, settle):
    rows = [l.rstrip("\n").split("\t") for l in open(results) if l.strip()]
    med = statistics.median

    def vals(kind, c, col, where=lambda r: True):
        return [float(r[col]) for r in rows if r[0] == kind and r[1] == c and where(r)]

    fails = {}
    for r in rows:
        if r[0] == "fail":
            fails.setdefault((r[1], r[3]), []).append(f"run {r[2]}: {r[4]}")
    status = {r[1]: (r[2], r[3] if len(r) > 3 else "") for r in rows if r[0] == "path"}

    def cell(v, measure, c, f):
        """The median of v formatted by f, or why there is none, with failed runs counted."""
        bad = [b for (fc, m), bs in fails.items() if fc == c and m.startswith(measure) for b in bs]
        if not v:
            st = status.get(c, ("ok", ""))[0]
            return "FAILED" if bad else ("SETUP FAILED" if st == "setup-failed" else
                                         "DIED" if st == "died" else "-")
        s = f(med(v))
        return s + (f" ({len(bad)} failed)" if bad else "")

    out = []
    p = out.append
    p("## Users' measures (medians over the rounds)")
    p("")
    p("| measure | " + " | ".join(LABELS.get(c, c) for c in configs) + " |")
    p("|---|" + "---:|" * len(configs))
    lat_direct = vals("latency", "direct", 3)
    for streams in ("1", "8"):
        for direction, what in (("normal", "client -> device"), ("reverse", "device -> client (-R)")):
            label = f"{streams} stream{'s' if streams != '1' else ''}, Gbit/s, {what}"
            sel = lambda r: r[3] == streams and r[4] == direction
            p(f"| {label} | " + " | ".join(
                cell(vals("iperf", c, 5, sel), f"iperf-{streams}-{direction}", c, lambda x: f"{x:.2f}")
                for c in configs) + " |")
    fair = lambda d: (lambda r: r[3] == "8" and r[4] == d and len(r) > 8)
    p("| 8 streams, fairness (min/max bytes of one stream), client -> device / -R | " + " | ".join(
        cell(vals("iperf", c, 8, fair("normal")), "iperf-8-normal", c, lambda x: f"{x:.2f}") + " / " +
        cell(vals("iperf", c, 8, fair("reverse")), "iperf-8-reverse", c, lambda x: f"{x:.2f}")
        for c in configs) + " |")
    cells = []
    for c in configs:
        v = vals("latency", c, 3)
        if c == "direct":
            cells.append(cell(v, "latency", c, lambda x: f"({x:.1f} µs)"))
        elif lat_direct and v:
            cells.append(cell(v, "latency", c, lambda x: f"{x - med(lat_direct):+.1f} µs"))
        else:
            cells.append(cell(v, "latency", c, lambda x: f"{x:.1f} µs (no direct)"))
    p("| 64 B round trip added, p50 (direct: its p50) | " + " | ".join(cells) + " |")
    na = lambda c, s: "n/a" if c == "direct" else s
    p("| RSS per held connection, all tunnel processes, KiB | " + " | ".join(
        na(c, cell(vals("held", c, 7), "held", c, lambda x: f"{x:.1f}")) for c in configs) + " |")
    p(f"| RSS given back {settle} s after they close | " + " | ".join(
        na(c, cell(vals("held", c, 8), "held", c, lambda x: f"{x:.0f}%".replace("-0%", "0%"))) for c in configs) + " |")
    p("| CPU s per GB (iperf3 runs), all tunnel processes | " + " | ".join(
        na(c, cell(vals("iperf_cpu", c, 3), "iperf", c, lambda x: f"{x:.2f}")) for c in configs) + " |")
    p("")
    p("Tunnel processes: iotunnel = client + server + agent; rathole = server + client; "
      "bore = server + local. GB = 10^9 bytes received by iperf3's receiver; held connections: "
      f"{', '.join(sorted({r[3] for r in rows if r[0] == 'held'})) or '-'} per round.")
    p("")
    shares = {r[1]: (r[2], r[9]) for r in rows if r[0] == "held" and len(r) > 9}
    for c in configs:
        if c in shares:
            p(f"- {LABELS.get(c, c)}: RSS per held connection by process, run {shares[c][0]}: "
              f"{shares[c][1].replace(',', ', ')} KiB")
    for c in configs:
        st, why = status.get(c, ("ok", ""))
        if st != "ok":
            p(f"- **{LABELS.get(c, c)}: {st}**: {why}")
    for (c, measure), bad in sorted(fails.items()):
        for b in bad:
            p(f"- {LABELS.get(c, c)}, {measure}, {b}")

    # The original tables: one Python bulk transfer, and the ping-pong.
    MIB = 1048576.0

    def fmt(v, scale=1.0, d=1):
        return f"**{med(v)/scale:.{d}f}** ({min(v)/scale:.{d}f}-{max(v)/scale:.{d}f})"

    p("")
    p("## One Python bulk transfer, and the 64-byte ping-pong")
    p("")
    p("| path | runs | MiB/s median (min-max) | tunnel CPU-s per GiB median | x direct | x rathole | x rathole-tls |")
    p("|---|---:|---|---:|---:|---:|---:|")
    tp = {c: vals("throughput", c, 3) for c in configs}
    for c in configs:
        v = tp[c]
        if not v:
            continue
        m = med(v)
        xd = f"{m / med(tp['direct']):.2f}" if tp.get("direct") else "-"
        xr = f"{m / med(tp['rathole']):.2f}" if tp.get("rathole") else "-"
        xrt = f"{m / med(tp['rathole-tls']):.2f}" if tp.get("rathole-tls") else "-"
        cpu_s = "-" if c == "direct" else f"{med(vals('throughput', c, 4)):.2f}"
        p(f"| {c} | {len(v)} | {fmt(v, MIB)} | {cpu_s} | {xd} | {xr} | {xrt} |")
    p("")
    p("| path | runs | p50 us median (min-max) | p99 us median (min-max) | p50 added over direct | p99 added over direct |")
    p("|---|---:|---|---|---:|---:|")
    lat50 = {c: vals("latency", c, 3) for c in configs}
    lat99 = {c: vals("latency", c, 4) for c in configs}
    for c in configs:
        if not lat50[c]:
            continue
        a50 = a99 = "-"
        if lat50.get("direct"):
            a50 = f"{med(lat50[c]) - med(lat50['direct']):+.1f} us"
            a99 = f"{med(lat99[c]) - med(lat99['direct']):+.1f} us"
        p(f"| {c} | {len(lat50[c])} | {fmt(lat50[c])} | {fmt(lat99[c])} | {a50} | {a99} |")
    print("\n".join(out))


cmd = sys.argv[1]
if cmd == "servers":
    # Small stacks: a thousand held connections are a thousand threads here.
    threading.stack_size(256 << 10)
    threading.Thread(target=serve, args=(sys.argv[2], sink), daemon=True).start()
    serve(sys.argv[3], echo)
elif cmd == "send":
    send(sys.argv[2], int(sys.argv[3]))
elif cmd == "ping":
    ping(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
elif cmd == "held":
    held(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5:])
elif cmd == "rss":
    print(rss_kib(sys.argv[2:]))
elif cmd == "iperf":
    iperf(sys.argv[2])
elif cmd == "summary":
    summary(sys.argv[2], sys.argv[3].split(), sys.argv[4] if len(sys.argv) > 4 else "5")
else:
    raise SystemExit(f"unknown command {cmd}")
