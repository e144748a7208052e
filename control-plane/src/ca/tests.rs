use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, KeyPair};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

use super::*;

fn csr(key: &KeyPair) -> String {
    CertificateParams::new(vec!["ignored.example".to_owned()])
        .unwrap()
        .serialize_request(key)
        .unwrap()
        .pem()
        .unwrap()
}

fn certs(pem: &str) -> Vec<Vec<u8>> {
    pem_certs(pem).unwrap()
}

fn uri_sans(der: &[u8]) -> Vec<String> {
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .collect()
}

/// Asserts that `child` is signed by `parent`'s key and names it as issuer.
fn assert_signed_by(child: &[u8], parent: &[u8]) {
    let (_, c) = X509Certificate::from_der(child).unwrap();
    let (_, p) = X509Certificate::from_der(parent).unwrap();
    assert_eq!(c.issuer(), p.subject());
    c.verify_signature(Some(p.public_key())).unwrap();
}

/// A user root valid from `not_before` to `not_after`, written to `dir`.
fn user_root(
    dir: &Path,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> (PathBuf, PathBuf, String) {
    let key = KeyPair::generate().unwrap();
    let params = ca_params(
        "test user root".into(),
        not_before,
        not_after,
        BasicConstraints::Unconstrained,
    );
    let cert = params.self_signed(&key).unwrap();
    let (c, k) = (dir.join("user-root.pem"), dir.join("user-root-key.pem"));
    fs::write(&c, cert.pem()).unwrap();
    fs::write(&k, key.serialize_pem()).unwrap();
    (c, k, cert.pem())
}

#[test]
fn self_signed_root_is_created_once_and_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let config = CaConfig::new(tmp.path().join("ca"));
    let ca = Ca::load_or_create(&config).unwrap();
    let dir = tmp.path().join("ca");
    for f in [
        ROOT_CERT_FILE,
        ROOT_KEY_FILE,
        ROOTS_FILE,
        crate::token::SECRET_FILE,
    ] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(ROOT_KEY_FILE)), 0o600);
    }
    let root = fs::read_to_string(dir.join(ROOT_CERT_FILE)).unwrap();
    assert_eq!(ca.roots_pem(), vec![root.clone()]);
    assert_eq!(fs::read_to_string(dir.join(ROOTS_FILE)).unwrap(), root);
    let years = (ca.issuer_not_after() - OffsetDateTime::now_utc()).whole_days() / 365;
    assert_eq!(years, 9, "about 10 years");
    let token = ca.token_secret().token("default", "web");

    let again = Ca::load_or_create(&config).unwrap();
    assert_eq!(again.roots_pem(), vec![root]);
    assert_eq!(again.token_secret().token("default", "web"), token);
    assert_eq!(again.issuer_not_after(), ca.issuer_not_after());
}

#[test]
fn signs_a_csr_into_an_svid() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::load_or_create(&CaConfig::new(tmp.path())).unwrap();
    let key = KeyPair::generate().unwrap();
    let before = OffsetDateTime::now_utc();
    let issued = ca
        .sign_csr(&csr(&key), "prod", "web", Some(Duration::from_secs(3600)))
        .unwrap();
    assert_eq!(issued.spiffe_id, "spiffe://cluster.local/ns/prod/sa/web");
    let chain = certs(&issued.chain_pem);
    assert_eq!(chain.len(), 1, "a self-signed root signs leaves directly");
    assert_signed_by(&chain[0], &certs(&ca.roots_pem()[0])[0]);
    assert_eq!(uri_sans(&chain[0]), vec![issued.spiffe_id.clone()]);

    let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
    // The CSR's key, not a new one.
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    let nb = leaf.validity().not_before.timestamp();
    let na = leaf.validity().not_after.timestamp();
    assert!(
        (before.unix_timestamp() - 60 - nb).abs() <= 2,
        "backdated 1 min"
    );
    assert!(
        (before.unix_timestamp() + 3600 - na).abs() <= 2,
        "1h as requested"
    );
    assert_eq!(na, issued.not_after.unix_timestamp());
    assert!(!leaf.is_ca());
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    // The CSR's own SAN (ignored.example) is not copied.
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(san.value.general_names.len(), 1);
}

#[test]
fn lifetime_defaults_and_caps() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = CaConfig::new(tmp.path());
    config.cert_ttl = Duration::from_secs(7200);
    let ca = Ca::load_or_create(&config).unwrap();
    assert_eq!(ca.lifetime(None), Duration::from_secs(7200));
    assert_eq!(ca.lifetime(Some(Duration::ZERO)), Duration::from_secs(7200));
    assert_eq!(
        ca.lifetime(Some(Duration::from_secs(60))),
        Duration::from_secs(60)
    );
    assert_eq!(
        ca.lifetime(Some(Duration::from_secs(10 * 86400))),
        Duration::from_secs(7200)
    );
}

#[test]
fn rejects_bad_names_and_csrs() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::load_or_create(&CaConfig::new(tmp.path())).unwrap();
    let good = csr(&KeyPair::generate().unwrap());
    for (ns, svc) in [
        ("default", ""),
        ("", "web"),
        ("default", "Web"),
        ("default", "web/../admin"),
        ("de fault", "web"),
        ("default", "-web"),
    ] {
        let err = ca.sign_csr(&good, ns, svc, None).unwrap_err();
        assert!(
            matches!(err, SignError::InvalidName { .. }),
            "{ns}/{svc}: {err}"
        );
    }
    let err = ca.sign_csr("garbage", "default", "web", None).unwrap_err();
    assert!(matches!(err, SignError::InvalidCsr(_)), "{err}");
    // A CSR whose signature does not verify: flip a byte of the signature (the DER's tail).
    let der = rustls::pki_types::CertificateSigningRequestDer::from(
        x509_parser::pem::parse_x509_pem(good.as_bytes())
            .unwrap()
            .1
            .contents,
    );
    let mut bytes = der.as_ref().to_vec();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x55;
    let tampered = der_to_pem("CERTIFICATE REQUEST", &bytes);
    let err = ca.sign_csr(&tampered, "default", "web", None).unwrap_err();
    assert!(matches!(err, SignError::InvalidCsr(_)), "{err}");
}

#[test]
fn refuses_when_the_issuer_expires_first_or_has_expired() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::load_or_create(&CaConfig::new(tmp.path())).unwrap();
    let good = csr(&KeyPair::generate().unwrap());
    let end = ca.issuer_not_after();
    // 1h before the root's end, a 24h certificate would outlive it.
    let err = ca
        .sign_csr_at(
            end - time::Duration::hours(1),
            &good,
            "default",
            "web",
            None,
        )
        .unwrap_err();
    assert!(matches!(err, SignError::IssuerExpiresFirst { .. }), "{err}");
    assert!(err.to_string().contains("refusing to sign"), "{err}");
    // A 30 min one is fine.
    ca.sign_csr_at(
        end - time::Duration::hours(1),
        &good,
        "default",
        "web",
        Some(Duration::from_secs(1800)),
    )
    .unwrap();
    let err = ca
        .sign_csr_at(
            end + time::Duration::seconds(1),
            &good,
            "default",
            "web",
            None,
        )
        .unwrap_err();
    assert!(matches!(err, SignError::IssuerExpired { .. }), "{err}");
    assert!(err.to_string().contains("expired at"), "{err}");
}

#[test]
fn expiry_warning_within_30_days() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::load_or_create(&CaConfig::new(tmp.path())).unwrap();
    let end = ca.issuer_not_after();
    assert!(ca.expiry_warning(OffsetDateTime::now_utc()).is_none());
    assert!(ca.expiry_warning(end - time::Duration::days(31)).is_none());
    let w = ca.expiry_warning(end - time::Duration::days(10)).unwrap();
    assert!(w.contains("in 9 days") || w.contains("in 10 days"), "{w}");
    let w = ca.expiry_warning(end + time::Duration::days(1)).unwrap();
    assert!(w.contains("EXPIRED"), "{w}");
}

#[test]
fn user_root_signs_through_a_persisted_intermediate() {
    let tmp = tempfile::tempdir().unwrap();
    let now = OffsetDateTime::now_utc();
    let (cert, key, root_pem) = user_root(
        tmp.path(),
        now - time::Duration::days(1),
        now + time::Duration::days(3650),
    );
    let mut config = CaConfig::new(tmp.path().join("ca"));
    config.root = Some((cert, key));
    let ca = Ca::load_or_create(&config).unwrap();
    assert_eq!(ca.roots_pem(), vec![root_pem.clone()]);
    assert!(!tmp.path().join("ca").join(ROOT_CERT_FILE).exists());
    let inter_pem = fs::read_to_string(tmp.path().join("ca").join(INTERMEDIATE_CERT_FILE)).unwrap();
    let days = (ca.issuer_not_after() - now).whole_days();
    assert!((364..=365).contains(&days), "1 year intermediate: {days}");

    let issued = ca
        .sign_csr(&csr(&KeyPair::generate().unwrap()), "default", "api", None)
        .unwrap();
    let chain = certs(&issued.chain_pem);
    assert_eq!(chain.len(), 2, "leaf + intermediate");
    assert_eq!(chain[1], certs(&inter_pem)[0]);
    assert_signed_by(&chain[0], &chain[1]);
    assert_signed_by(&chain[1], &certs(&root_pem)[0]);
    let (_, inter) = X509Certificate::from_der(&chain[1]).unwrap();
    assert!(inter.is_ca());

    // Restart: the same intermediate.
    let again = Ca::load_or_create(&config).unwrap();
    assert_eq!(again.issuer_not_after(), ca.issuer_not_after());
    assert_eq!(
        fs::read_to_string(tmp.path().join("ca").join(INTERMEDIATE_CERT_FILE)).unwrap(),
        inter_pem
    );

    // Another root: a new intermediate, signed by it.
    let other = tempfile::tempdir().unwrap();
    let (cert2, key2, root2) = user_root(
        other.path(),
        now - time::Duration::days(1),
        now + time::Duration::days(3650),
    );
    config.root = Some((cert2, key2));
    let rotated = Ca::load_or_create(&config).unwrap();
    assert_eq!(rotated.roots_pem(), vec![root2.clone()]);
    let inter2 = fs::read_to_string(tmp.path().join("ca").join(INTERMEDIATE_CERT_FILE)).unwrap();
    assert_ne!(inter2, inter_pem);
    assert_signed_by(&certs(&inter2)[0], &certs(&root2)[0]);
}

#[test]
fn intermediate_is_capped_at_the_roots_expiry() {
    let tmp = tempfile::tempdir().unwrap();
    let now = OffsetDateTime::now_utc();
    let root_end = now + time::Duration::hours(2);
    let (cert, key, _) = user_root(tmp.path(), now - time::Duration::days(1), root_end);
    let mut config = CaConfig::new(tmp.path().join("ca"));
    config.root = Some((cert, key));
    let ca = Ca::load_or_create(&config).unwrap();
    assert_eq!(
        ca.issuer_not_after().unix_timestamp(),
        root_end.unix_timestamp()
    );
    let err = ca
        .sign_csr(&csr(&KeyPair::generate().unwrap()), "default", "web", None)
        .unwrap_err();
    assert!(matches!(err, SignError::IssuerExpiresFirst { .. }), "{err}");
    ca.sign_csr(
        &csr(&KeyPair::generate().unwrap()),
        "default",
        "web",
        Some(Duration::from_secs(3600)),
    )
    .unwrap();
}

#[test]
fn expired_user_root_loads_but_refuses_to_sign() {
    let tmp = tempfile::tempdir().unwrap();
    let now = OffsetDateTime::now_utc();
    let (cert, key, _) = user_root(
        tmp.path(),
        now - time::Duration::days(30),
        now - time::Duration::days(1),
    );
    let mut config = CaConfig::new(tmp.path().join("ca"));
    config.root = Some((cert, key));
    let ca = Ca::load_or_create(&config).unwrap();
    let err = ca
        .sign_csr(&csr(&KeyPair::generate().unwrap()), "default", "web", None)
        .unwrap_err();
    assert!(matches!(err, SignError::IssuerExpired { .. }), "{err}");
    assert!(ca.issue_local(&["localhost".into()], &[]).is_err());
}

#[test]
fn rejects_a_key_that_does_not_match_the_root() {
    let tmp = tempfile::tempdir().unwrap();
    let now = OffsetDateTime::now_utc();
    let (cert, _, _) = user_root(tmp.path(), now, now + time::Duration::days(10));
    let wrong = tmp.path().join("wrong-key.pem");
    fs::write(&wrong, KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let mut config = CaConfig::new(tmp.path().join("ca"));
    config.root = Some((cert, wrong));
    let err = Ca::load_or_create(&config).unwrap_err().to_string();
    assert!(err.contains("does not belong"), "{err}");
}

#[test]
fn extra_roots_join_the_bundle_and_reload() {
    let tmp = tempfile::tempdir().unwrap();
    let now = OffsetDateTime::now_utc();
    let (_, _, new_root) = user_root(tmp.path(), now, now + time::Duration::days(3650));
    let extra = tmp.path().join("extra.pem");
    fs::write(&extra, &new_root).unwrap();
    let mut config = CaConfig::new(tmp.path().join("ca"));
    config.extra_roots = vec![extra.clone()];
    let ca = Ca::load_or_create(&config).unwrap();
    let roots = ca.roots_pem();
    assert_eq!(roots.len(), 2);
    assert_eq!(roots[1], new_root);
    assert_eq!(fs::read_to_string(ca.roots_file()).unwrap(), roots.concat());
    assert!(!ca.reload_extra_roots().unwrap(), "unchanged");

    // Rotation finished: the extra file now holds nothing new (the same root twice is deduped).
    fs::write(&extra, roots[0].clone()).unwrap();
    assert!(ca.reload_extra_roots().unwrap());
    assert_eq!(ca.roots_pem(), vec![roots[0].clone()]);
    assert_eq!(fs::read_to_string(ca.roots_file()).unwrap(), roots[0]);

    // A broken file keeps the previous bundle.
    fs::write(&extra, "nonsense").unwrap();
    assert!(ca.reload_extra_roots().is_err());
    assert_eq!(ca.roots_pem(), vec![roots[0].clone()]);
}

#[test]
fn local_cert_for_the_grpc_server() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = CaConfig::new(tmp.path());
    config.trust_domain = "example.org".into();
    let ca = Ca::load_or_create(&config).unwrap();
    let local = ca
        .issue_local(&["localhost".into()], &["127.0.0.9".parse().unwrap()])
        .unwrap();
    assert_eq!(local.chain_der.len(), 1);
    assert_eq!(
        uri_sans(&local.chain_der[0]),
        vec!["spiffe://example.org/ns/weft-system/sa/weft-control".to_owned()]
    );
    let (_, cert) = X509Certificate::from_der(&local.chain_der[0]).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert!(san
        .value
        .general_names
        .contains(&GeneralName::DNSName("localhost")));
    assert!(san
        .value
        .general_names
        .contains(&GeneralName::IPAddress(&[127, 0, 0, 9])));
}

#[test]
fn invalid_trust_domain_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = CaConfig::new(tmp.path());
    config.trust_domain = "Bad/Domain".into();
    assert!(matches!(
        Ca::load_or_create(&config),
        Err(CaError::TrustDomain(_))
    ));
}

#[test]
fn pem_round_trip() {
    let der = vec![1u8; 100];
    let pem = der_to_pem("CERTIFICATE", &der);
    assert!(pem.lines().all(|l| l.len() <= 64));
    assert_eq!(pem_certs(&pem).unwrap(), vec![der]);
    assert!(pem_certs("").is_err());
}
