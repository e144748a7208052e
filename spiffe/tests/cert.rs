use rcgen::string::Ia5String;
use rcgen::{date_time_ymd, CertificateParams, KeyPair, SanType};
use weft_spiffe::{from_cert_der, validity, SpiffeError, SpiffeId};

fn cert_with(sans: Vec<SanType>) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params.not_before = date_time_ymd(2024, 1, 2);
    params.not_after = date_time_ymd(2024, 2, 3);
    let key = KeyPair::generate().unwrap();
    params.self_signed(&key).unwrap().der().to_vec()
}

fn uri(s: &str) -> SanType {
    SanType::URI(Ia5String::try_from(s).unwrap())
}

fn dns(s: &str) -> SanType {
    SanType::DnsName(Ia5String::try_from(s).unwrap())
}

#[test]
fn single_spiffe_uri_san() {
    let der = cert_with(vec![
        dns("web.default.svc"),
        uri("spiffe://cluster.local/ns/default/sa/web"),
    ]);
    let id = from_cert_der(&der).unwrap();
    assert_eq!(
        id,
        SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap()
    );
    assert_eq!(id.workload(), Some(("default", "web")));
}

#[test]
fn no_san_is_missing() {
    let der = cert_with(vec![]);
    assert_eq!(from_cert_der(&der), Err(SpiffeError::Missing));
}

#[test]
fn no_uri_san_is_missing() {
    let der = cert_with(vec![dns("web.default.svc")]);
    assert_eq!(from_cert_der(&der), Err(SpiffeError::Missing));
}

#[test]
fn only_non_spiffe_uri_san_is_missing() {
    let der = cert_with(vec![uri("https://example.org/x")]);
    assert_eq!(from_cert_der(&der), Err(SpiffeError::Missing));
}

#[test]
fn two_spiffe_uri_sans_are_ambiguous() {
    let der = cert_with(vec![uri("spiffe://td/a"), uri("spiffe://td/b")]);
    assert_eq!(
        from_cert_der(&der),
        Err(SpiffeError::Ambiguous(vec![
            "spiffe://td/a".into(),
            "spiffe://td/b".into()
        ]))
    );
}

#[test]
fn spiffe_and_https_uri_sans_are_ambiguous() {
    let der = cert_with(vec![uri("spiffe://td/a"), uri("https://td/b")]);
    assert!(matches!(
        from_cert_der(&der),
        Err(SpiffeError::Ambiguous(uris)) if uris.len() == 2
    ));
}

#[test]
fn invalid_spiffe_uri_san_reports_parse_error() {
    let der = cert_with(vec![uri("spiffe://Cluster.local/ns/a/sa/b")]);
    assert!(matches!(
        from_cert_der(&der),
        Err(SpiffeError::BadTrustDomainChar { ch: 'C', .. })
    ));
}

#[test]
fn uppercase_scheme_uri_san_reports_wrong_scheme() {
    let der = cert_with(vec![uri("SPIFFE://td/a")]);
    assert!(matches!(
        from_cert_der(&der),
        Err(SpiffeError::WrongScheme { .. })
    ));
}

#[test]
fn garbage_is_bad_certificate() {
    for bytes in [
        &b""[..],
        b"not a certificate",
        &[0x30, 0x82, 0xff, 0xff, 0x00],
    ] {
        assert!(matches!(
            from_cert_der(bytes),
            Err(SpiffeError::BadCertificate(_))
        ));
        assert!(matches!(
            validity(bytes),
            Err(SpiffeError::BadCertificate(_))
        ));
    }
}

#[test]
fn trailing_bytes_are_bad_certificate() {
    let mut der = cert_with(vec![uri("spiffe://td/a")]);
    der.push(0);
    assert!(matches!(
        from_cert_der(&der),
        Err(SpiffeError::BadCertificate(_))
    ));
}

#[test]
fn validity_returns_rcgen_dates() {
    let der = cert_with(vec![uri("spiffe://td/a")]);
    assert_eq!(
        validity(&der).unwrap(),
        (
            date_time_ymd(2024, 1, 2).unix_timestamp(),
            date_time_ymd(2024, 2, 3).unix_timestamp()
        )
    );
    // 2024-01-02T00:00:00Z, as a check independent of rcgen's own conversion.
    assert_eq!(validity(&der).unwrap().0, 1_704_153_600);
}
