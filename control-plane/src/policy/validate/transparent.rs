//! `mesh.vip_range`, `mesh.protocol_detection` and `services[].vip` (transparent mode).

use std::collections::HashMap;

use super::{Collector, FileView};
use crate::policy::transparent::{
    allocate_vips, parse_vip, IpRange, ProtocolDetection, MAX_DETECT_TIMEOUT,
};
use crate::policy::Service;

/// Checks every service's `vip` (an address, unique), the mesh's range and detection settings,
/// and that the range has an address for every service without a declared VIP.
pub(super) fn check(c: &mut Collector<'_>, parsed: &[FileView<'_>], all: &[Service]) {
    let mut seen: HashMap<std::net::IpAddr, String> = HashMap::new();
    for (fi, file) in parsed.iter().enumerate() {
        for (si, s) in file.services.iter().enumerate() {
            let Some(vip) = &s.vip else { continue };
            let field = format!("services[{si}].vip");
            match parse_vip(vip) {
                Err(reason) => c.push(fi, field, reason),
                Ok(ip) => {
                    let name = format!("{}.{}", s.name, s.namespace);
                    if let Some(other) = seen.get(&ip).filter(|o| **o != name) {
                        c.push(
                            fi,
                            field,
                            format!("{ip} is also the virtual IP of service {other:?}"),
                        );
                    } else {
                        seen.insert(ip, name);
                    }
                }
            }
        }
    }
    for (fi, file) in parsed.iter().enumerate() {
        let Some(mesh) = &file.mesh else { continue };
        check_detection(c, fi, &mesh.protocol_detection);
        let Some(range) = &mesh.vip_range else {
            continue;
        };
        match IpRange::parse(range) {
            Err(reason) => c.push(fi, "mesh.vip_range".to_owned(), reason),
            Ok(r) => {
                if let Err(reason) = allocate_vips(all, Some(&r)) {
                    c.push(fi, "mesh.vip_range".to_owned(), reason);
                }
            }
        }
    }
}

fn check_detection(c: &mut Collector<'_>, fi: usize, d: &ProtocolDetection) {
    if d.timeout.is_zero() || d.timeout > MAX_DETECT_TIMEOUT {
        c.push(
            fi,
            "mesh.protocol_detection.timeout".to_owned(),
            format!("{:?} is outside 1ms..={MAX_DETECT_TIMEOUT:?}", d.timeout),
        );
    }
    for (name, ports) in [
        ("server_first_ports", &d.server_first_ports),
        ("opaque_ports", &d.opaque_ports),
    ] {
        if let Some(i) = ports.iter().position(|p| *p == 0) {
            c.push(
                fi,
                format!("mesh.protocol_detection.{name}[{i}]"),
                "port 0 is not a port (1..=65535)",
            );
        }
    }
}
