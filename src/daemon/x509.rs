//! What the daemons read of an X.509 certificate themselves (RFC 5280
//! §4.1): its validity period and whether its extended key usage allows
//! server authentication. webpki verifies; this only reads certificates
//! already trusted or the daemon's own (an operator's file), to say more.

/// The validity period (Unix seconds) of a certificate and whether its
/// extended key usage, if it has one, allows server authentication.
#[derive(Debug, PartialEq)]
pub struct LeafFacts {
    pub not_before: u64,
    pub not_after: u64,
    pub server_auth: bool,
}

/// id-ce-extKeyUsage (2.5.29.37).
const EXT_KEY_USAGE: &[u8] = &[0x55, 0x1d, 0x25];
/// id-kp-serverAuth (1.3.6.1.5.5.7.3.1).
const SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
/// anyExtendedKeyUsage (2.5.29.37.0).
const ANY_EKU: &[u8] = &[0x55, 0x1d, 0x25, 0x00];

/// Reads [`LeafFacts`] from a certificate's DER (RFC 5280 §4.1).
pub fn leaf_facts(der: &[u8]) -> Option<LeafFacts> {
    use crate::tunnel::tls::der_next;
    let (0x30, cert, _) = der_next(der)? else {
        return None;
    };
    let (0x30, tbs, _) = der_next(cert)? else {
        return None;
    };
    let mut rest = tbs;
    // version [0] EXPLICIT, optional
    if rest.first() == Some(&0xa0) {
        rest = der_next(rest)?.2;
    }
    // serialNumber, signature, issuer
    for _ in 0..3 {
        rest = der_next(rest)?.2;
    }
    let (0x30, validity, after) = der_next(rest)? else {
        return None;
    };
    let (t1, not_before, validity) = der_next(validity)?;
    let (t2, not_after, _) = der_next(validity)?;
    let not_before = asn1_time(t1, not_before)?;
    let not_after = asn1_time(t2, not_after)?;
    // subject, subjectPublicKeyInfo, then the optional [1], [2], [3].
    let mut rest = der_next(der_next(after)?.2)?.2;
    let mut server_auth = true;
    while let Some((tag, body, next)) = der_next(rest) {
        rest = next;
        if tag != 0xa3 {
            continue;
        }
        let (0x30, mut exts, _) = der_next(body)? else {
            return None;
        };
        while let Some((0x30, ext, next)) = der_next(exts) {
            exts = next;
            let (0x06, oid, mut value) = der_next(ext)? else {
                return None;
            };
            if oid != EXT_KEY_USAGE {
                continue;
            }
            // critical BOOLEAN DEFAULT FALSE
            if value.first() == Some(&0x01) {
                value = der_next(value)?.2;
            }
            let (0x04, octets, _) = der_next(value)? else {
                return None;
            };
            let (0x30, mut purposes, _) = der_next(octets)? else {
                return None;
            };
            server_auth = false;
            while let Some((0x06, purpose, next)) = der_next(purposes) {
                purposes = next;
                if purpose == SERVER_AUTH || purpose == ANY_EKU {
                    server_auth = true;
                }
            }
        }
    }
    Some(LeafFacts {
        not_before,
        not_after,
        server_auth,
    })
}

/// UTCTime (`YYMMDDHHMMSSZ`, years 1950–2049) or GeneralizedTime
/// (`YYYYMMDDHHMMSSZ`) as Unix seconds; times before 1970 read as 0.
fn asn1_time(tag: u8, text: &[u8]) -> Option<u64> {
    let digits = |s: &[u8]| -> Option<i64> {
        s.iter().try_fold(0i64, |acc, b| {
            b.is_ascii_digit().then(|| acc * 10 + i64::from(b - b'0'))
        })
    };
    let (year, rest) = match (tag, text.len()) {
        (0x17, 13) => {
            let yy = digits(&text[..2])?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &text[2..])
        }
        (0x18, 15) => (digits(&text[..4])?, &text[4..]),
        _ => return None,
    };
    if rest[10] != b'Z' {
        return None;
    }
    let field = |i: usize| digits(&rest[i..i + 2]);
    let (month, day) = (field(0)?, field(2)?);
    let (hour, minute, second) = (field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    // Howard Hinnant's days-from-civil.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second;
    Some(u64::try_from(secs).unwrap_or(0))
}

/// The first certificate of the PEM file at `path`, if it reads as one.
pub fn first_pem_cert(path: &std::path::Path) -> Option<Vec<u8>> {
    let pem = std::fs::read(path).ok()?;
    let cert = rustls_pemfile::certs(&mut pem.as_slice()).next()?.ok()?;
    Some(cert.to_vec())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rustls::pki_types::CertificateDer;

    #[test]
    fn asn1_times_read_as_unix_seconds() {
        assert_eq!(asn1_time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(asn1_time(0x17, b"261208101112Z"), Some(1_796_724_672));
        assert_eq!(asn1_time(0x18, b"20261208101112Z"), Some(1_796_724_672));
        assert_eq!(asn1_time(0x18, b"20991231235959Z"), Some(4_102_444_799));
        assert_eq!(asn1_time(0x17, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(asn1_time(0x17, b"500101000000Z"), Some(0));
        assert_eq!(asn1_time(0x17, b"261308101112Z"), None);
        assert_eq!(asn1_time(0x17, b"2612081011120"), None);
        assert_eq!(asn1_time(0x18, b"261208101112Z"), None);
        assert_eq!(asn1_time(0x04, b"261208101112Z"), None);
    }

    /// A self-signed CA certificate for `names`, with `eku`, valid from
    /// the first of January of one year to that of another.
    pub(crate) fn self_signed_ca(
        names: Vec<String>,
        eku: Vec<rcgen::ExtendedKeyUsagePurpose>,
        (from, to): (i32, i32),
    ) -> (CertificateDer<'static>, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(names).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.extended_key_usages = eku;
        p.not_before = rcgen::date_time_ymd(from, 1, 1);
        p.not_after = rcgen::date_time_ymd(to, 1, 1);
        let cert = p.self_signed(&key).unwrap();
        (cert.der().clone(), key)
    }

    #[test]
    fn a_leaf_facts_are_read_from_its_der() {
        use rcgen::ExtendedKeyUsagePurpose as P;
        let (der, _) = self_signed_ca(vec!["a".into()], vec![], (2020, 2099));
        let f = leaf_facts(&der).unwrap();
        assert_eq!(f.not_before, asn1_time(0x17, b"200101000000Z").unwrap());
        assert_eq!(f.not_after, asn1_time(0x18, b"20990101000000Z").unwrap());
        assert!(f.server_auth, "no EKU: any purpose");
        let (der, _) = self_signed_ca(vec!["a".into()], vec![P::ClientAuth], (2020, 2099));
        assert!(!leaf_facts(&der).unwrap().server_auth);
        let (der, _) = self_signed_ca(
            vec!["a".into()],
            vec![P::ClientAuth, P::ServerAuth],
            (2020, 2099),
        );
        assert!(leaf_facts(&der).unwrap().server_auth);
        let (der, _) = self_signed_ca(vec!["a".into()], vec![P::Any], (2020, 2099));
        assert!(leaf_facts(&der).unwrap().server_auth);
        assert_eq!(leaf_facts(&der[..der.len() - 1]), None);
        assert_eq!(leaf_facts(b"\x30\x00"), None);
    }
}
