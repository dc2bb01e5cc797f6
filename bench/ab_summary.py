"""Medians of a bench-ab.sh pair of files (OUT.before, OUT.after): closed loop,
and at each fixed rate p50/p99 and every party's CPU per 1,000 commands.
    python3 bench/ab_summary.py bench/ab-unix-socket.jsonl"""
import json, statistics, sys

def runs(path):
    return [json.loads(l) for l in open(path) if l.strip()]

def med(xs):
    return statistics.median(xs) if xs else float("nan")

base = sys.argv[1]
for side in ("before", "after"):
    rs = runs(f"{base}.{side}")
    print(f"{side}: {len(rs)} runs; closed loop {med([r['worker']['rate'] for r in rs]):.0f} /s "
          f"({', '.join('%.0f' % r['worker']['rate'] for r in rs)})")
    rates = sorted({f["rate"] for r in rs for f in r.get("fixed_rates", []) if f["target"] == "worker"})
    for rate in rates:
        rows = [f for r in rs for f in r["fixed_rates"] if f["target"] == "worker" and f["rate"] == rate]
        c = lambda k: med([f["cpu_per_1k"][k] for f in rows])
        print(f"  {rate:.0f}/s: p50 {med([f['p50_ms'] for f in rows]):.2f} p99 {med([f['p99_ms'] for f in rows]):.1f} | "
              f"worker {c('worker'):.3f} pg {c('postgres'):.3f} broker {c('broker'):.3f} bench {c('bench'):.3f} "
              f"drain {c('drain'):.3f} all {c('total'):.3f} (each: {', '.join('%.3f' % f['cpu_per_1k']['total'] for f in rows)}) "
              f"run queue {med([f['run_queue_per_1k'] for f in rows]):.2f}")
    sizes = [r["rounds"][0]["stages"]["mean_batch_size"] for r in rs if r["rounds"][0].get("stages")]
    print("  closed-loop batch sizes: " + ", ".join("%.1f" % s for s in sizes))
