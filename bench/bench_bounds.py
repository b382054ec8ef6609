#!/usr/bin/env python3
"""The most scenarios (b) and (c) of `ortserve bench` could reach on the machine that ran it.

Reads the results.json that `ortserve bench --scenarios bc` wrote and, per run, divides the cores
each line used (the `cpu` split the bench reads from /proc) by the requests or rows it served, to
get CPU seconds per request for the HTTP side (server and load generator) and per row for the
device. With 2 cores in all, rows/s can be no more than 2 / (cost per row, all parts added).

  (b) the CNN fixture: in-process cost per row (2 cores / ceiling rows/s) plus the HTTP cost of the
      bare axum handler that reads the same body (server + load generator): what a server with no
      overhead of its own could do.
  (c) cnn_wide on two slots: that line's own costs per row (device, HTTP, load generator), and the
      same with the bare handler's HTTP cost in place of ortserve's; over the one-slot rows/s.

Usage: python3 bench/bench_bounds.py [docs/bench/results.json] [--cores 2]
"""

import argparse
import json


def find(run, scenario, prefix, concurrency=None):
    for r in run:
        if r["scenario"] == scenario and r["variant"].startswith(prefix):
            if concurrency is None or r["concurrency"] == concurrency:
                return r
    return None


def per(line, part, unit):
    return line["cpu"][part] / line[unit]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="?", default="docs/bench/results.json")
    ap.add_argument("--cores", type=float, default=2.0)
    args = ap.parse_args()
    with open(args.results) as f:
        runs = json.load(f)["runs"]
    cores = args.cores
    for i, run in enumerate(runs, 1):
        ceiling = find(run, "b", "in-process ceiling, cnn,")
        bare = find(run, "b", "bare axum handler reading")
        served = find(run, "b", "ortserve V2 binary, cnn", 32)
        if ceiling and bare and bare.get("cpu") and served:
            c = ceiling["rows_per_second"]
            http = per(bare, "http", "requests_per_second")
            gen = per(bare, "loadgen", "requests_per_second")
            bound = cores / (cores / c + http + gen)
            print(
                f"run {i} (b) cnn: in-process {cores / c * 1e6:.1f} us/row; bare handler "
                f"{http * 1e6:.1f} us + load generator {gen * 1e6:.1f} us per request; "
                f"at most {bound:.0f} rows/s = {bound / c:.2f} of the ceiling; "
                f"ortserve {served['ratio']:.2f}"
            )
        one = find(run, "c", "cnn_wide: cpu:0,")
        two = find(run, "c", "cnn_wide: cpu:0 +")
        if one and two and two.get("cpu") and bare and bare.get("cpu"):
            dev = per(two, "device", "rows_per_second")
            http = per(two, "http", "rows_per_second")
            gen = per(two, "loadgen", "rows_per_second")
            own = cores / (dev + http + gen)
            ideal = cores / (
                dev
                + per(bare, "http", "requests_per_second")
                + per(bare, "loadgen", "requests_per_second")
            )
            base = one["rows_per_second"]
            print(
                f"run {i} (c) cnn_wide two slots: device {dev * 1e6:.0f} us/row, HTTP "
                f"{http * 1e6:.0f} us + load generator {gen * 1e6:.0f} us per request, "
                f"idle {two['cpu']['idle']:.2f} cores; at most {own / base:.2f} x one slot with "
                f"these costs, {ideal / base:.2f} x with the bare handler's HTTP cost; "
                f"ortserve {two['ratio']:.2f} x"
            )


if __name__ == "__main__":
    main()
