"""The report printed at the end: operations, outcomes and latencies per kind, the daemon's
RSS and every unexpected error; its last line is machine-readable."""

from __future__ import annotations

from soak_base import SoakBase
from soak_model import MiB


def percentile(values: list[float], p: int) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, -(-len(ordered) * p // 100) - 1))]


def report(soak: SoakBase, status: int) -> str:
    lines = [
        f"{'kind':<26}{'ops':>7}{'ok':>7}{'other':>7}{'errors':>7}"
        f"{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}  outcomes"
    ]
    with soak.stats.lock:
        kinds = sorted(soak.stats.outcomes)
        for kind in kinds:
            outcomes = soak.stats.outcomes[kind]
            lat = soak.stats.latency[kind]
            total = sum(outcomes.values())
            ok = outcomes.get("ok", 0)
            errs = outcomes.get("error", 0)
            other = {k: v for k, v in outcomes.items() if k not in ("ok", "error")}
            lines.append(
                f"{kind:<26}{total:>7}{ok:>7}{sum(other.values()):>7}{errs:>7}"
                + "".join(f"{percentile(lat, p) * 1000:>9.1f}" for p in (50, 95, 99, 100))
                + ("  " + " ".join(f"{k}={v}" for k, v in sorted(other.items())))
            )
        notes = dict(sorted(soak.stats.notes.items()))
        ops = sum(
            sum(c.values()) for k, c in soak.stats.outcomes.items() if not k.startswith("step:")
        )
    lines.append("")
    lines.append(f"deleted while being read: {soak.delete_while_read}")
    lines.append("notes: " + ", ".join(f"{k}={v}" for k, v in notes.items()))
    growth = float("nan")
    if "start" in soak.rss and "end" in soak.rss:
        growth = (soak.rss["end"] - soak.rss["start"]) / MiB
        peak = max([soak.rss["hwm"], *soak.rss_samples]) / MiB
        lines.append(
            f"daemon {soak.daemon_pid} RSS: after mount {soak.rss.get('mounted', 0) / MiB:.1f}"
            f" MiB, load start {soak.rss['start'] / MiB:.1f} MiB, end"
            f" {soak.rss['end'] / MiB:.1f} MiB, peak (VmHWM) {peak:.1f} MiB,"
            f" growth {growth:+.1f} MiB"
        )
        if soak.rss_samples:
            n = len(soak.rss_samples)
            quarters = [soak.rss_samples[min(n - 1, n * k // 4)] / MiB for k in (1, 2, 3, 4)]
            lines.append(
                "daemon RSS at each quarter of the load: "
                + ", ".join(f"{q:.1f}" for q in quarters)
                + " MiB"
            )
    else:
        lines.append("daemon RSS: unknown (daemon not found)")
    if soak.known:
        lines.append(f"known bugs hit (--known, not counted): {len(soak.known)}")
        lines.extend(f"  {e}" for e in soak.known[:20])
    lines.append(f"errors: {len(soak.errors)}")
    lines.extend(f"  {e}" for e in soak.errors[:100])
    ok = int(status == 0)
    lines.append(f"SOAK ok={ok} errors={len(soak.errors)} ops={ops} rss_growth_mib={growth:.1f}")
    return "\n".join(lines)
