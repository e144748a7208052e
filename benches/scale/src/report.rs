//! The table of a matrix of runs (`weft-scale table a.json b.json ...`) and the issue's
//! targets checked against it: after an apply, 1,000 proxies converge in < 1 s p99 and 5,000
//! in < 3 s; the control plane's RSS stays < 200 MB at 5,000 proxies.

use std::fmt::Write as _;

use crate::run::{PhaseReport, Report};

fn phase<'a>(r: &'a Report, name: &str) -> Option<&'a PhaseReport> {
    r.phases.iter().find(|p| p.name == name)
}

fn secs(ms: Option<f64>) -> String {
    ms.map_or("-".to_owned(), |v| format!("{:.2}", v / 1000.0))
}

fn millis(ms: Option<f64>) -> String {
    ms.map_or("-".to_owned(), |v| format!("{v:.0}"))
}

/// `p50 / p99 / max` in ms, with `(k/n)` when not every affected proxy converged.
fn latencies(p: Option<&PhaseReport>) -> String {
    let Some(p) = p else {
        return "-".to_owned();
    };
    let mut s = format!(
        "{} / {} / {}",
        millis(p.p50_ms),
        millis(p.p99_ms),
        millis(p.max_ms)
    );
    if p.converged < p.affected || p.timed_out {
        let _ = write!(s, " ({}/{} TIMED OUT)", p.converged, p.affected);
    }
    s
}

fn per_push(p: Option<&PhaseReport>) -> String {
    p.and_then(|p| p.pushes.bytes.checked_div(p.pushes.count))
        .map_or("-".to_owned(), |b| format!("{:.1}", b as f64 / 1024.0))
}

fn cpu(p: Option<&PhaseReport>) -> String {
    p.map_or("-".to_owned(), |p| format!("{:.2}", p.cp_cpu_s))
}

fn compilations(p: Option<&PhaseReport>) -> String {
    p.map_or("-".to_owned(), |p| format!("{:.0}", p.compilations))
}

/// One markdown table, a row per run.
pub fn table(reports: &[Report]) -> String {
    let mut out = String::new();
    out.push_str(
        "| N | replicas | services (deps) | cold: all ACKed s (p50 / p99) | mesh-wide apply → ACK ms p50 / p99 / max | one-service apply → ACK ms p50 / p99 / max (proxies) | CP CPU s cold / mesh-wide / one | CP peak RSS MB | KiB per push cold / mesh-wide / one | compilations cold / mesh-wide / one | pushes to unaffected | loadavg before |\n",
    );
    out.push_str("|---:|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in reports {
        let cold = phase(r, "cold");
        let mesh = phase(r, "mesh-wide");
        let one = phase(r, "one-service");
        let deps = if r.deps == 0 {
            "none".to_owned()
        } else {
            r.deps.to_string()
        };
        let rss: Vec<String> = r.cp_peak_rss_mb.iter().map(|m| format!("{m:.0}")).collect();
        let loads: Vec<String> = r
            .phases
            .iter()
            .map(|p| {
                p.loadavg_before
                    .split_whitespace()
                    .next()
                    .unwrap_or("?")
                    .to_owned()
            })
            .collect();
        let _ = writeln!(
            out,
            "| {} | {} ({}) | {} ({}) | {} ({} / {}){} | {} | {} ({}) | {} / {} / {} | {} | {} / {} / {} | {} / {} / {} | {} | {} |",
            r.n,
            r.replicas,
            r.store,
            r.services,
            deps,
            secs(cold.and_then(|c| c.max_ms)),
            secs(cold.and_then(|c| c.p50_ms)),
            secs(cold.and_then(|c| c.p99_ms)),
            cold.filter(|c| c.converged < c.affected || c.timed_out)
                .map_or(String::new(), |c| format!(" {}/{} TIMED OUT", c.converged, c.affected)),
            latencies(mesh),
            latencies(one),
            one.map_or(0, |p| p.affected),
            cpu(cold),
            cpu(mesh),
            cpu(one),
            rss.join(" + "),
            per_push(cold),
            per_push(mesh),
            per_push(one),
            compilations(cold),
            compilations(mesh),
            compilations(one),
            one.map_or(0, |p| p.pushes_to_unaffected),
            loads.join(" / "),
        );
    }
    out
}

/// The targets, one line each, for the runs that measure them.
pub fn targets(reports: &[Report]) -> String {
    let mut out = String::new();
    for r in reports {
        let bound_ms = match r.n {
            1000 => 1000.0,
            5000 => 3000.0,
            _ => continue,
        };
        for name in ["mesh-wide", "one-service"] {
            let Some(p) = phase(r, name) else { continue };
            let met =
                p.converged == p.affected && !p.timed_out && p.p99_ms.is_some_and(|v| v < bound_ms);
            let _ = writeln!(
                out,
                "- N={} replicas={} deps={}: {name} apply → last ACK p99 {} ms < {bound_ms:.0} ms: **{}**",
                r.n,
                r.replicas,
                if r.deps == 0 { "none".to_owned() } else { r.deps.to_string() },
                millis(p.p99_ms),
                if met { "met" } else { "missed" }
            );
        }
        if r.n == 5000 {
            let peak = r.cp_peak_rss_mb.iter().copied().fold(0.0, f64::max);
            let _ = writeln!(
                out,
                "- N=5000 replicas={} deps={}: control-plane peak RSS {peak:.0} MB < 200 MB (largest replica): **{}**",
                r.replicas,
                if r.deps == 0 { "none".to_owned() } else { r.deps.to_string() },
                if peak < 200.0 && peak > 0.0 { "met" } else { "missed" }
            );
        }
    }
    out
}
