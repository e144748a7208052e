//! A throwaway CA for unit tests: roots, leaves with SPIFFE URI SANs, expired leaves.

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

use super::certs::Issued;
use super::trust::TrustBundle;

pub(crate) struct TestCa {
    pub domain: String,
    params: CertificateParams,
    key: KeyPair,
    root: CertificateDer<'static>,
}

pub(crate) struct TestLeaf {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl TestLeaf {
    pub fn issued(&self) -> Issued {
        Issued::new(self.chain.clone(), &self.key).unwrap()
    }
}

impl TestCa {
    pub fn new(domain: &str) -> Self {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("test root {domain}"));
        let root = params.self_signed(&key).unwrap().der().clone();
        Self {
            domain: domain.into(),
            params,
            key,
            root,
        }
    }

    pub fn root_der(&self) -> CertificateDer<'static> {
        self.root.clone()
    }

    pub fn root_pem(&self) -> String {
        use std::fmt::Write;
        let b64 = base64_encode(&self.root);
        let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            let _ = writeln!(out, "{}", std::str::from_utf8(chunk).unwrap());
        }
        out.push_str("-----END CERTIFICATE-----\n");
        out
    }

    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::from_der(&self.domain, vec![self.root_der()]).unwrap()
    }

    /// A leaf valid from a minute ago for `ttl_secs` from now.
    pub fn leaf(&self, uri: &str, ttl_secs: i64) -> TestLeaf {
        let now = OffsetDateTime::now_utc();
        self.leaf_between(
            uri,
            now - Duration::minutes(1),
            now + Duration::seconds(ttl_secs),
        )
    }

    pub fn leaf_between(
        &self,
        uri: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> TestLeaf {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        params.not_before = not_before;
        params.not_after = not_after;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let issuer = Issuer::new(self.params.clone(), &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        TestLeaf {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        }
    }
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl TestCa {
    /// Signs a PEM CSR for `uri`, valid from a minute ago for `ttl_secs`.
    pub fn sign_csr(&self, csr_pem: &str, uri: &str, ttl_secs: i64) -> String {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).unwrap();
        let now = OffsetDateTime::now_utc();
        csr.params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        csr.params.not_before = now - Duration::minutes(1);
        csr.params.not_after = now + Duration::seconds(ttl_secs);
        csr.params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let issuer = Issuer::new(self.params.clone(), &self.key);
        csr.signed_by(&issuer).unwrap().pem()
    }
}
