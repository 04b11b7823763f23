"""Ratios and the printed report of a benchmark run."""

CPU_ORDER = ("generator", "pplex", "haproxy", "worker", "echo", "machine")
CPU_SHORT = {"generator": "gen", "machine": "| machine"}
# A row whose "other" CPU exceeds this (% of one core) ran on a busy box.
OTHER_LOAD_WARN = 25


def fmt_int(v):
    return "{:,}".format(int(round(v)))


def fmt_us(v):
    if v >= 10000:
        return "{:,}".format(int(round(v)))
    return "%.1f" % v


def fmt_cpu(cpu):
    parts = []
    for name in CPU_ORDER:
        if name in cpu and not isinstance(cpu[name], dict):
            parts.append("%s %d" % (CPU_SHORT.get(name, name), round(cpu[name])))
    if "other" in cpu:
        parts.append("(other %d)" % round(cpu["other"]))
    return " ".join(parts)


def fmt_size(size):
    """32 -> "32 B", 1024 -> "1 KiB", 262144 -> "256 KiB"."""
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return "%d %s" % (size // scale, unit)
    return "%d B" % size


def fmt_ratio(r):
    return "n/a" if r is None else "%.2fx" % r


def _find(rows, row, clients, title=None):
    for r in rows:
        if r["row"] == row and r["clients"] == clients and "error" not in r \
                and (title is None or r["title"] == title):
            return r
    return None


def _ratio(a, b, key="rt_per_s"):
    if a is None or b is None or not b.get(key):
        return None
    return round(a[key] / b[key], 3)


def ratios(rows, pipelined, sized=()):
    """{pplex row title: its ratios}: one entry per pplex variant measured (one per transport)."""
    titles = list(dict.fromkeys(r["title"] for r in rows + pipelined + list(sized) if r["row"] == "pplex")) \
        or ["pplex"]
    out = {}
    for title in titles:
        mine = out[title] = {"closed_loop": [], "pipelined": None, "sizes": []}
        for size in dict.fromkeys(r["size"] for r in sized):
            of_size = [r for r in sized if r["size"] == size]
            p = _find(of_size, "pplex", of_size[0]["clients"], title)
            h = _find(of_size, "haproxy", of_size[0]["clients"])
            mine["sizes"].append({"size": size, "clients": of_size[0]["clients"],
                                  "pplex_over_haproxy": _ratio(p, h),
                                  "p99_pplex_over_haproxy": _ratio(p, h, "p99_us")})
        for n in sorted({r["clients"] for r in rows}):
            p = _find(rows, "pplex", n, title)
            h = _find(rows, "haproxy", n)
            mine["closed_loop"].append({
                "clients": n,
                "pplex_over_haproxy": _ratio(p, h),
                "pplex_over_grpc_direct": _ratio(p, _find(rows, "grpc", n)),
                "haproxy_over_ceiling": _ratio(h, _find(rows, "ceiling", n)),
                "p50_pplex_over_haproxy": _ratio(p, h, "p50_us"),
                "p99_pplex_over_haproxy": _ratio(p, h, "p99_us"),
            })
        if pipelined:
            n = pipelined[0]["clients"]
            mine["pipelined"] = {"clients": n, "pplex_over_haproxy": _ratio(_find(pipelined, "pplex", n, title),
                                                                            _find(pipelined, "haproxy", n))}
    return out


def _row_line(r, width, lead=None):
    """One row; `lead` is the first column (default: the client count)."""
    title = r["title"]
    lead = "%7d" % r["clients"] if lead is None else "%7s" % lead
    if "error" in r:
        return "%s  %-*s  FAILED: %s" % (lead, width, title, r["error"].splitlines()[0][:100])
    warn = "  (!) %s" % r["warning"].splitlines()[-1][:60] if r.get("warning") else ""
    if r.get("cpu", {}).get("other", 0) > OTHER_LOAD_WARN:
        warn += "  *"
    return "%s  %-*s %11s %10s %10s %7d   %s%s" % (
        lead, width, title, fmt_int(r["rt_per_s"]), fmt_us(r["p50_us"]),
        fmt_us(r["p99_us"]), r.get("errors", 0), fmt_cpu(r.get("cpu", {})), warn)


def render(res):
    cfg = res["config"]
    m = res["machine"]
    L = []
    w = L.append
    w("")
    w("pplex benchmark  %s  (%.0f s)" % (res["started"], res["duration_s"]))
    w("machine: %s CPUs %s, Linux %s, Python %s, %s" % (
        m["cpus"], m["cpu_model"], m["kernel"], m["python"], m["haproxy"]))
    w("load: closed loop, %d-byte messages, 1 in flight per client, %g s measured after %g s warm-up;"
      " worker: %s" % (cfg["size"], cfg["seconds"], cfg["warmup"], cfg["worker"] or "-"))
    for name, why in sorted(res["unavailable"].items()):
        w("UNAVAILABLE %s: %s" % (name, why.splitlines()[0]))
    w("")
    width = 17
    w("%7s  %-*s %11s %10s %10s %7s   %s" % ("clients", width, "row", "round trips/s", "p50 us",
                                         "p99 us", "errors", "CPU % during the window (100 = one core)"))
    last = None
    for r in res["rows"]:
        if last is not None and r["clients"] != last:
            w("")
        last = r["clients"]
        w(_row_line(r, width))

    detail = [r for r in res["rows"] + res["pipelined"] if r.get("cpu", {}).get("threads", {}).get("pplex")]
    if detail:
        w("")
        w("pplex CPU by thread (% of one core): main = the main thread (pplex's reactor: client"
          " sockets; with h2 also the worker streams), pplex = its other Python threads (grpcio's"
          " stream readers/writers),"
          " event_engine / grpc_* = gRPC C-core:")
        for r in detail:
            th = r["cpu"]["threads"]["pplex"]
            top = ", ".join("%s %d" % (k, round(v)) for k, v in list(th.items())[:5])
            w("  N=%d%s %s: %s" % (r["clients"], " x%d" % r["pipeline"] if r.get("pipeline", 1) > 1 else "",
                                  r["title"], top))

    rat = res["ratios"]
    busy = [r for r in res["rows"] + res["pipelined"]
            if r.get("cpu", {}).get("other", 0) > OTHER_LOAD_WARN]
    if busy:
        w("")
        w("* %d row(s) ran while something else used > %d%% of a core (the 'other' figure):"
          " the box was shared, so those rows are noisy; rerun for clean ratios."
          % (len(busy), OTHER_LOAD_WARN))
    if any(v["closed_loop"] for v in rat.values()):
        w("")
        w("ratios (same run; throughput = round trips/s, latency = p50/p99):")
        w("%7s  %-16s %14s  %18s  %17s  %16s  %16s" % ("clients", "pplex row", "pplex/HAProxy",
                                                      "pplex/gRPC-direct", "HAProxy/ceiling",
                                                      "p50 pplex/HAProxy", "p99 pplex/HAProxy"))
        for title, mine in rat.items():
            for r in mine["closed_loop"]:
                w("%7d  %-16s %14s  %18s  %17s  %16s  %16s" % (
                    r["clients"], title, fmt_ratio(r["pplex_over_haproxy"]),
                    fmt_ratio(r["pplex_over_grpc_direct"]), fmt_ratio(r["haproxy_over_ceiling"]),
                    fmt_ratio(r["p50_pplex_over_haproxy"]), fmt_ratio(r["p99_pplex_over_haproxy"])))

    if res["pipelined"]:
        p0 = res["pipelined"][0]
        w("")
        w("pipelined: %d clients x %d messages in flight (messages/s):" % (p0["clients"], p0["pipeline"]))
        for r in res["pipelined"]:
            w(_row_line(r, width))
        for title, mine in rat.items():
            if mine.get("pipelined"):
                w("  %s / HAProxy pipelined: %s" % (title, fmt_ratio(mine["pipelined"]["pplex_over_haproxy"])))

    if res.get("sized"):
        w("")
        w("message sizes: %d closed-loop clients, one message in flight each (round trips/s; MiB/s each way):"
          % cfg["sizes_clients"])
        last = None
        for r in res["sized"]:
            if last is not None and r["size"] != last:
                w("")
            last = r["size"]
            w(_row_line(r, width, lead=fmt_size(r["size"])) +
              ("" if "error" in r else "  %.1f MiB/s" % (r["rt_per_s"] * r["size"] / 2**20)))
        for title, mine in rat.items():
            if mine.get("sizes"):
                w("  %s / HAProxy by size: %s" % (title, "   ".join(
                    "%s: %s" % (fmt_size(s["size"]), fmt_ratio(s["pplex_over_haproxy"])) for s in mine["sizes"])))

    if res["memory"]:
        w("")
        w("idle memory per connection (%s idle TCP connections, VmRSS after - before, fresh process):"
          % fmt_int(cfg["idle_conns"]))
        for r in res["memory"]:
            if "error" in r and "bytes_per_conn" not in r:
                w("  %-8s FAILED: %s" % (r["target"], r["error"].splitlines()[0][:100]))
                continue
            note = "" if r.get("rss_stable", True) else "  (RSS still moving)"
            if r.get("error"):
                note += "  (!) " + r["error"].splitlines()[0]
            if r["connections"] != cfg["idle_conns"]:
                note += "  (only %s: RLIMIT_NOFILE %s)" % (fmt_int(r["connections"]), cfg["rlimit_nofile"])
            w("  %-8s %8s bytes/conn   RSS %.1f -> %.1f MiB, %s opened, %s accepted%s" % (
                r["target"], fmt_int(r["bytes_per_conn"]), r["rss_before"] / 2**20,
                r["rss_after"] / 2**20, fmt_int(r["opened"]), fmt_int(r["accepted"]), note))

    # The headline, last so it is what stays on screen.
    heads = []
    for title, mine in rat.items():
        if not mine["closed_loop"]:
            continue
        text = "   ".join("N=%d: %s" % (r["clients"], fmt_ratio(r["pplex_over_haproxy"]))
                           for r in mine["closed_loop"])
        if mine.get("pipelined"):
            text += "   pipelined: %s" % fmt_ratio(mine["pipelined"]["pplex_over_haproxy"])
        if mine.get("sizes"):
            text += "   " + "  ".join("%s: %s" % (fmt_size(s["size"]), fmt_ratio(s["pplex_over_haproxy"]))
                                      for s in mine["sizes"] if s["size"] != cfg["size"])
        heads.append("  HEADLINE  %-*s / HAProxy throughput   %s  " % (max(map(len, rat)), title, text))
    if heads:
        width = max(len(h) for h in heads)
        w("")
        w("=" * width)
        L.extend(heads)
        w("=" * width)
    w("")
    return "\n".join(L)
