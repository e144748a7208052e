//! `--inject-config FILE`: what the webhook injects (the chart mounts it from the ConfigMap
//! `<release>-inject`, key `inject.yaml`). YAML, unknown fields rejected, every value checked
//! when the file is read; re-read when the file changes, the last good one kept if the new one
//! is broken (logged with `file: field: reason`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use serde::Deserialize;

/// Largest config file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct InjectConfig {
    pub proxy: ProxyConfig,
    pub control_plane: ControlPlaneConfig,
    #[serde(default)]
    pub identity: IdentityConfig,
    #[serde(default)]
    pub capture: CaptureConfig,
}

/// `proxy:`: the sidecar container.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProxyConfig {
    /// The weft-proxy image (required).
    pub image: String,
    #[serde(default = "default_pull_policy")]
    pub image_pull_policy: String,
    /// The proxy's runAsUser and runAsGroup; capture leaves its traffic alone.
    #[serde(default = "default_uid")]
    pub uid: i64,
    /// The proxy's log filter (`RUST_LOG`), e.g. `info` or `info,weft_proxy=debug`.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    #[serde(default)]
    pub resources: Resources,
}

/// `resources:` of the proxy (and the capture init container).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default)]
    pub requests: BTreeMap<String, Quantity>,
    #[serde(default)]
    pub limits: BTreeMap<String, Quantity>,
}

/// A Kubernetes quantity (`50m`, `32Mi`, `1`), written as a string or a number.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "serde_yaml::Value")]
pub struct Quantity(pub String);

impl TryFrom<serde_yaml::Value> for Quantity {
    type Error = String;

    fn try_from(v: serde_yaml::Value) -> Result<Self, String> {
        let text = match v {
            serde_yaml::Value::String(s) => s,
            serde_yaml::Value::Number(n) => n.to_string(),
            other => {
                return Err(format!(
                    "expected a quantity such as 50m or 32Mi, got {other:?}"
                ))
            }
        };
        if is_quantity(&text) {
            Ok(Self(text))
        } else {
            Err(format!(
                "{text:?} is not a Kubernetes quantity (e.g. 50m, 0.5, 32Mi, 1G)"
            ))
        }
    }
}

/// Whether `s` is a Kubernetes resource quantity: a decimal number with an optional binary
/// (`Ki`..`Ei`), decimal (`n`, `u`, `m`, `k`, `M`..`E`) or exponent (`e3`) suffix.
pub fn is_quantity(s: &str) -> bool {
    let digits_end = s
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_digit() || *c == '.' || *c == '+' || *c == '-'))
        .map_or(s.len(), |(i, _)| i);
    let (number, suffix) = s.split_at(digits_end);
    let number = number.strip_prefix(['+', '-']).unwrap_or(number);
    let valid_number = !number.is_empty()
        && number.chars().filter(|c| *c == '.').count() <= 1
        && number.chars().all(|c| c.is_ascii_digit() || c == '.')
        && number.chars().any(|c| c.is_ascii_digit());
    let valid_suffix = matches!(
        suffix,
        "" | "Ki"
            | "Mi"
            | "Gi"
            | "Ti"
            | "Pi"
            | "Ei"
            | "n"
            | "u"
            | "m"
            | "k"
            | "M"
            | "G"
            | "T"
            | "P"
            | "E"
    ) || suffix
        .strip_prefix(['e', 'E'])
        .map(|e| e.strip_prefix(['+', '-']).unwrap_or(e))
        .is_some_and(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_digit()));
    valid_number && valid_suffix && s.len() <= 64
}

/// Resource names the proxy's requests and limits may set.
pub const RESOURCE_NAMES: [&str; 3] = ["cpu", "memory", "ephemeral-storage"];

/// `controlPlane:`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlaneConfig {
    /// What injected proxies dial, e.g. `https://weft-control.weft-system.svc:15010`.
    pub address: String,
}

/// `identity:`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IdentityConfig {
    #[serde(default)]
    pub service_from: ServiceFrom,
    /// The pod label naming the service with `serviceFrom: label`.
    #[serde(default = "default_service_label")]
    pub service_label: String,
    /// Audience of the projected ServiceAccount token (the control plane's `--k8s-audience`).
    #[serde(default = "default_audience")]
    pub token_audience: String,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            service_from: ServiceFrom::default(),
            service_label: default_service_label(),
            token_audience: default_audience(),
        }
    }
}

/// Where an injected pod's service name comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ServiceFrom {
    /// The pod's ServiceAccount name (what the projected token proves).
    #[default]
    ServiceAccount,
    /// A pod label (`serviceLabel`); it must equal the ServiceAccount name, since that is what
    /// the control plane certifies.
    Label,
}

/// `capture:`: never captured, for every injected pod (annotations add more).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CaptureConfig {
    #[serde(default)]
    pub exclude_inbound_ports: Vec<u16>,
    #[serde(default)]
    pub exclude_outbound_ports: Vec<u16>,
    #[serde(default, rename = "excludeOutboundCIDRs")]
    pub exclude_outbound_cidrs: Vec<String>,
}

fn default_pull_policy() -> String {
    "IfNotPresent".to_owned()
}
fn default_uid() -> i64 {
    1337
}
fn default_log_level() -> String {
    "info".to_owned()
}
fn default_service_label() -> String {
    "app.kubernetes.io/name".to_owned()
}
fn default_audience() -> String {
    "weft".to_owned()
}

/// Errors reading the config: they name the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--inject-config {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--inject-config {path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// Checks a port list value such as `exclude-inbound-ports`.
pub fn check_ports(field: &str, ports: &[u16]) -> Result<(), String> {
    match ports.iter().find(|p| **p == 0) {
        Some(_) => Err(format!("{field}: port 0 is not a port")),
        None => Ok(()),
    }
}

/// Checks a CIDR (`10.0.0.0/8`, `fd00::/8`) or a bare address.
pub fn check_cidr(value: &str) -> Result<(), String> {
    let (ip, prefix) = value.split_once('/').unwrap_or((value, ""));
    let ip: IpAddr = ip
        .trim()
        .parse()
        .map_err(|_| format!("{value:?} is not an IP address or CIDR"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if !prefix.is_empty()
        && prefix
            .trim()
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .is_none()
    {
        return Err(format!("{value:?}: the prefix must be 0..={max}"));
    }
    Ok(())
}

/// Checks a log filter the proxy will accept.
pub fn check_log_level(value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > 256 {
        return Err(format!(
            "{value:?}: expected a filter such as info or info,weft_proxy=debug"
        ));
    }
    tracing_subscriber::EnvFilter::try_new(value)
        .map(|_| ())
        .map_err(|e| format!("{value:?} is not a log filter: {e}"))
}

impl InjectConfig {
    /// Parses and checks the YAML of `origin`.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            path: origin.to_owned(),
            reason,
        };
        let config: InjectConfig =
            serde_yaml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        config.validate().map_err(invalid)?;
        Ok(config)
    }

    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let io = |source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        };
        let len = std::fs::metadata(path).map_err(io)?.len();
        if len > MAX_CONFIG_BYTES {
            return Err(ConfigError::Invalid {
                path: path.display().to_string(),
                reason: format!("{len} bytes, more than {MAX_CONFIG_BYTES}"),
            });
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        Self::parse(&text, &path.display().to_string())
    }

    fn validate(&self) -> Result<(), String> {
        let p = &self.proxy;
        if p.image.trim().is_empty() || p.image.chars().any(char::is_whitespace) {
            return Err(format!(
                "proxy.image: {:?} is not an image reference",
                p.image
            ));
        }
        if !matches!(
            p.image_pull_policy.as_str(),
            "Always" | "IfNotPresent" | "Never"
        ) {
            return Err(format!(
                "proxy.imagePullPolicy: {:?}: expected Always, IfNotPresent or Never",
                p.image_pull_policy
            ));
        }
        if !(1..=i64::from(i32::MAX)).contains(&p.uid) {
            return Err(format!(
                "proxy.uid: {}: expected a non-root uid (1..=2147483647)",
                p.uid
            ));
        }
        check_log_level(&p.log_level).map_err(|e| format!("proxy.logLevel: {e}"))?;
        for (what, map) in [
            ("requests", &p.resources.requests),
            ("limits", &p.resources.limits),
        ] {
            if let Some(name) = map.keys().find(|k| !RESOURCE_NAMES.contains(&k.as_str())) {
                return Err(format!(
                    "proxy.resources.{what}.{name}: unknown resource (expected one of {})",
                    RESOURCE_NAMES.join(", ")
                ));
            }
        }
        match self.control_plane.address.parse::<http::Uri>() {
            Ok(u) if u.scheme_str() == Some("https") && u.host().is_some() => {}
            _ => {
                return Err(format!(
                    "controlPlane.address: {:?} is not an https://host:port URL (injected proxies verify the control plane with its CA)",
                    self.control_plane.address
                ))
            }
        }
        let id = &self.identity;
        if id.token_audience.trim().is_empty() {
            return Err("identity.tokenAudience: must not be empty".to_owned());
        }
        if id.service_label.is_empty() || id.service_label.len() > 317 {
            return Err(format!(
                "identity.serviceLabel: {:?} is not a label key",
                id.service_label
            ));
        }
        let c = &self.capture;
        check_ports("capture.excludeInboundPorts", &c.exclude_inbound_ports)?;
        check_ports("capture.excludeOutboundPorts", &c.exclude_outbound_ports)?;
        for cidr in &c.exclude_outbound_cidrs {
            check_cidr(cidr).map_err(|e| format!("capture.excludeOutboundCIDRs: {e}"))?;
        }
        Ok(())
    }
}

/// What identifies a version of a file (re-read when it changes): a ConfigMap or Secret
/// volume swaps the file behind a symlink, which changes its inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl FileStamp {
    /// The stamp of `path` (following symlinks).
    pub fn of(path: &Path) -> Option<Self> {
        let m = std::fs::metadata(path).ok()?;
        Some(Self {
            modified: m.modified().ok(),
            len: m.len(),
            inode: std::os::unix::fs::MetadataExt::ino(&m),
        })
    }
}

/// The config file, re-read when it changes.
#[derive(Debug)]
pub struct ConfigFile {
    path: PathBuf,
    current: ArcSwap<InjectConfig>,
    stamp: Mutex<Option<FileStamp>>,
}

impl ConfigFile {
    /// Loads `path` (an unusable file is an error: the webhook does not start).
    pub fn load(path: impl Into<PathBuf>) -> Result<Self, ConfigError> {
        let path = path.into();
        let stamp = FileStamp::of(&path);
        let config = InjectConfig::load(&path)?;
        Ok(Self {
            path,
            current: ArcSwap::from_pointee(config),
            stamp: Mutex::new(stamp),
        })
    }

    /// The config in force, re-read first if the file changed (a broken file keeps the last
    /// good config, logged once per change).
    pub fn current(&self) -> Arc<InjectConfig> {
        let mut last = self
            .stamp
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = FileStamp::of(&self.path);
        if now.is_some() && now != *last {
            *last = now;
            match InjectConfig::load(&self.path) {
                Ok(config) => {
                    tracing::info!(path = %self.path.display(), "injection config reloaded");
                    self.current.store(Arc::new(config));
                }
                Err(e) => tracing::error!("{e} (keeping the previous injection config)"),
            }
        }
        self.current.load_full()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
proxy:
  image: "weft/weft-proxy:0.1.0"
  imagePullPolicy: IfNotPresent
  uid: 1337
  logLevel: info
  resources: {requests: {cpu: 50m, memory: 32Mi}, limits: {memory: 128Mi}}
controlPlane:
  address: "https://weft-control.weft-system.svc:15010"
identity:
  serviceFrom: serviceAccount
  serviceLabel: app.kubernetes.io/name
  tokenAudience: weft
capture:
  excludeInboundPorts: []
  excludeOutboundPorts: []
  excludeOutboundCIDRs: []
"#;

    #[test]
    fn the_interface_example_parses() {
        let c = InjectConfig::parse(EXAMPLE, "inject.yaml").unwrap();
        assert_eq!(c.proxy.uid, 1337);
        assert_eq!(c.proxy.resources.requests["cpu"], Quantity("50m".into()));
        assert_eq!(c.identity.service_from, ServiceFrom::ServiceAccount);
        let minimal = InjectConfig::parse(
            "proxy: {image: weft/weft-proxy:1}\ncontrolPlane: {address: 'https://cp:15010'}\n",
            "inject.yaml",
        )
        .unwrap();
        assert_eq!(minimal.proxy.image_pull_policy, "IfNotPresent");
        assert_eq!(minimal.identity.token_audience, "weft");
        let numbers = InjectConfig::parse(
            "proxy: {image: x, resources: {limits: {cpu: 1, memory: 1e9}}}\ncontrolPlane: {address: 'https://cp:1'}\n",
            "inject.yaml",
        )
        .unwrap();
        assert_eq!(numbers.proxy.resources.limits["cpu"], Quantity("1".into()));
    }

    #[test]
    fn mistakes_name_the_file_and_field() {
        for (yaml, needle) in [
            ("proxy: {image: x, imag: y}\ncontrolPlane: {address: 'https://cp:1'}", "imag"),
            ("controlPlane: {address: 'https://cp:1'}", "proxy"),
            ("proxy: {image: x}\ncontrolPlane: {address: 'http://cp:1'}", "controlPlane.address"),
            ("proxy: {image: x, uid: 0}\ncontrolPlane: {address: 'https://cp:1'}", "proxy.uid"),
            ("proxy: {image: x, imagePullPolicy: Sometimes}\ncontrolPlane: {address: 'https://cp:1'}", "imagePullPolicy"),
            ("proxy: {image: x, resources: {requests: {cpu: lots}}}\ncontrolPlane: {address: 'https://cp:1'}", "lots"),
            ("proxy: {image: x, resources: {requests: {gpu: 1}}}\ncontrolPlane: {address: 'https://cp:1'}", "proxy.resources.requests.gpu"),
            ("proxy: {image: x, logLevel: 'info,,=['}\ncontrolPlane: {address: 'https://cp:1'}", "proxy.logLevel"),
            ("proxy: {image: x}\ncontrolPlane: {address: 'https://cp:1'}\ncapture: {excludeOutboundCIDRs: [10.0.0.0/33]}", "excludeOutboundCIDRs"),
            ("proxy: {image: x}\ncontrolPlane: {address: 'https://cp:1'}\nidentity: {serviceFrom: annotation}", "annotation"),
        ] {
            let err = InjectConfig::parse(yaml, "inject.yaml").unwrap_err().to_string();
            assert!(err.starts_with("--inject-config inject.yaml: "), "{err}");
            assert!(err.contains(needle), "{needle} not in {err}");
        }
    }

    #[test]
    fn quantities() {
        for ok in [
            "50m",
            "0.5",
            "32Mi",
            "1G",
            "1e3",
            "128974848",
            "+1",
            "1.5Gi",
        ] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["", "m", "lots", "1.2.3", "5 Mi", "1Mb", "-", "1e"] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }

    #[test]
    fn the_file_is_reread_when_it_changes_keeping_the_last_good() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inject.yaml");
        std::fs::write(&path, EXAMPLE).unwrap();
        let file = ConfigFile::load(&path).unwrap();
        assert_eq!(file.current().proxy.image, "weft/weft-proxy:0.1.0");
        let tmp = dir.path().join("tmp");
        std::fs::write(&tmp, EXAMPLE.replace("0.1.0", "0.2.0")).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(file.current().proxy.image, "weft/weft-proxy:0.2.0");
        std::fs::write(&path, "proxy: [").unwrap();
        assert_eq!(file.current().proxy.image, "weft/weft-proxy:0.2.0");
    }
}
