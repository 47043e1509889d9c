//! OSEP-0011 signed routes: a short signature that grants access to one sandbox port until an
//! expiry, so a link can be shared without handing out the sandbox's token.
//!
//! canonical = `v1\nshort\n{id}\n{port}\n{expires_b36}\n`
//! inner     = BE32(len(secret)) || secret || BE32(len(canonical)) || canonical
//! signature = hex(SHA-256(inner)[..4]) followed by the one-character key id.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Length of a signature: 8 lowercase hex digits and the key id.
pub const SIGNATURE_LEN: usize = 9;
const CANONICAL_PREFIX: &[u8] = b"v1\nshort\n";
/// The longest base-36 expiry that fits in a u64 (`3w5e11264sgsf`).
const MAX_B36_LEN: usize = 13;

/// Whether `c` may name a signing key.
pub fn is_key_id(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// Whether `s` has the shape of a signature (not whether it is valid).
pub fn is_signature_shape(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == SIGNATURE_LEN
        && b[..8]
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
        && is_key_id(b[8])
}

/// Parses a lowercase base-36 expiry (seconds since the Unix epoch).
pub fn parse_b36(s: &str) -> Option<u64> {
    // Canonical form only: a leading zero would let one expiry have many spellings.
    if s.is_empty() || s.len() > MAX_B36_LEN || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    s.bytes().try_fold(0u64, |acc, c| {
        let digit = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'z' => c - b'a' + 10,
            _ => return None,
        };
        acc.checked_mul(36)?.checked_add(u64::from(digit))
    })
}

/// Formats seconds since the Unix epoch as lowercase base 36.
pub fn format_b36(mut v: u64) -> String {
    if v == 0 {
        return "0".into();
    }
    let mut digits = Vec::with_capacity(MAX_B36_LEN);
    while v > 0 {
        let d = (v % 36) as u8;
        digits.push(if d < 10 { b'0' + d } else { b'a' + d - 10 });
        v /= 36;
    }
    digits.reverse();
    String::from_utf8(digits).unwrap_or_default()
}

/// Computes the signature of a route. `port` is the decimal port exactly as it appears in the route.
pub fn sign(
    secret: &[u8],
    key_id: u8,
    id: &str,
    port: &str,
    expires_b36: &str,
) -> [u8; SIGNATURE_LEN] {
    let canonical_len = CANONICAL_PREFIX.len() + id.len() + port.len() + expires_b36.len() + 3;
    let mut h = Sha256::new();
    h.update((secret.len() as u32).to_be_bytes());
    h.update(secret);
    h.update((canonical_len as u32).to_be_bytes());
    h.update(CANONICAL_PREFIX);
    for part in [id, port, expires_b36] {
        h.update(part.as_bytes());
        h.update(b"\n");
    }
    let digest = h.finalize();
    let mut out = [0u8; SIGNATURE_LEN];
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, byte) in digest[..4].iter().enumerate() {
        out[2 * i] = HEX[usize::from(byte >> 4)];
        out[2 * i + 1] = HEX[usize::from(byte & 0x0f)];
    }
    out[8] = key_id;
    out
}

/// Why a signed route was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("ingress verifier not configured")]
    NoKeys,
    #[error("unauthorized: malformed signature")]
    Malformed,
    #[error("unauthorized: unknown signed_key_id")]
    UnknownKey,
    #[error("access expired")]
    Expired,
    #[error("unauthorized: signature mismatch")]
    Mismatch,
    /// Valid, but expiring further ahead than the verifier accepts (a gateway setting; the
    /// reference has no bound).
    #[error("unauthorized: expiry too far ahead")]
    TooFarAhead,
}

/// A set of signing keys, each named by one character.
pub trait KeyLookup {
    /// Whether any key is configured.
    fn is_empty(&self) -> bool;
    /// The secret named `id`.
    fn secret(&self, id: u8) -> Option<&[u8]>;
}

/// Checks a signed route at time `now` (seconds since the Unix epoch); `now == expires` is valid.
pub fn verify(
    keys: &impl KeyLookup,
    id: &str,
    port: &str,
    expires_b36: &str,
    signature: &str,
    now: u64,
) -> Result<(), SignatureError> {
    if keys.is_empty() {
        return Err(SignatureError::NoKeys);
    }
    if !is_signature_shape(signature) {
        return Err(SignatureError::Malformed);
    }
    let expires = parse_b36(expires_b36).ok_or(SignatureError::Malformed)?;
    if now > expires {
        return Err(SignatureError::Expired);
    }
    let key_id = signature.as_bytes()[8];
    let secret = keys.secret(key_id).ok_or(SignatureError::UnknownKey)?;
    let want = sign(secret, key_id, id, port, expires_b36);
    if bool::from(want.ct_eq(signature.as_bytes())) {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Keys(Vec<(u8, Vec<u8>)>);
    impl KeyLookup for Keys {
        fn is_empty(&self) -> bool {
            self.0.is_empty()
        }
        fn secret(&self, id: u8) -> Option<&[u8]> {
            self.0
                .iter()
                .find(|(k, _)| *k == id)
                .map(|(_, s)| s.as_slice())
        }
    }

    fn sig(secret: &str, key: u8, id: &str, port: &str, exp: &str) -> String {
        String::from_utf8(sign(secret.as_bytes(), key, id, port, exp).to_vec()).unwrap()
    }

    #[test]
    fn reference_vectors() {
        assert_eq!(
            sig("test-secret-bytes", b'z', "my-sandbox", "9000", "x2qxvk"),
            "8e1e06e3z"
        );
        assert_eq!(
            sig(
                "test-secret-bytes",
                b'z',
                "my-sandbox",
                "9000",
                "3w5e11264sgsf"
            ),
            "ce06eeb8z"
        );
        assert_eq!(
            sig("ingress-test-secret", b'k', "gamma", "7777", "x2qxvk"),
            "8df586d8k"
        );
        assert_eq!(
            sig(
                "my-base64-decoded-secret!",
                b'a',
                "my-sandbox",
                "8080",
                "x2qxvk"
            ),
            "21e6a3d0a"
        );
        assert_eq!(
            sig("uri-mode-secret", b'a', "d-e", "3000", "x2qxvk"),
            "8c431392a"
        );
        assert_eq!(sig("k", b'z', "s", "1", "0"), "dd8b701ez");
        let bytes = |b: &[u8], id: &str, port: &str| {
            String::from_utf8(sign(b, b'a', id, port, "0").to_vec()).unwrap()
        };
        assert_eq!(bytes(&[0x5e; 4], "nosec", "8080"), "2def8676a");
    }

    #[test]
    fn base36_round_trip_and_bounds() {
        assert_eq!(parse_b36("3w5e11264sgsf"), Some(u64::MAX));
        assert_eq!(parse_b36("3w5e11264sgsg"), None);
        assert_eq!(parse_b36("zzzzzzzzzzzzzz"), None);
        assert_eq!(parse_b36(""), None);
        assert_eq!(parse_b36("X2QXVK"), None);
        assert_eq!(parse_b36("0x2qxvk"), None);
        assert_eq!(parse_b36("0"), Some(0));
        for v in [0, 1, 35, 36, 1_999_999_999, u64::MAX] {
            assert_eq!(parse_b36(&format_b36(v)), Some(v));
        }
    }

    #[test]
    fn verify_outcomes() {
        let keys = Keys(vec![(b'z', b"test-secret-bytes".to_vec())]);
        let exp = parse_b36("x2qxvk").unwrap();
        let ok = |s: &str, now| verify(&keys, "my-sandbox", "9000", "x2qxvk", s, now);
        assert_eq!(ok("8e1e06e3z", exp), Ok(()));
        assert_eq!(ok("8e1e06e3z", exp + 1), Err(SignatureError::Expired));
        assert_eq!(ok("8e1e06e4z", 0), Err(SignatureError::Mismatch));
        assert_eq!(ok("8e1e06e3y", 0), Err(SignatureError::UnknownKey));
        assert_eq!(ok("8E1E06E3z", 0), Err(SignatureError::Malformed));
        assert_eq!(
            verify(&Keys(vec![]), "a", "1", "0", "8e1e06e3z", 0),
            Err(SignatureError::NoKeys)
        );
    }

    use proptest::prelude::*;

    proptest! {
        #[test]
        fn base36_round_trips(v: u64) {
            prop_assert_eq!(parse_b36(&format_b36(v)), Some(v));
        }

        #[test]
        fn signatures_verify_only_with_their_key(
            secret in proptest::collection::vec(any::<u8>(), 1..64),
            other in proptest::collection::vec(any::<u8>(), 1..64),
            id in "[a-z0-9-]{1,40}",
            port in 1u16..,
            expires in 1u64..,
        ) {
            let exp = format_b36(expires);
            let port = port.to_string();
            let sig = sign(&secret, b'a', &id, &port, &exp);
            let sig = std::str::from_utf8(&sig).unwrap();
            prop_assert!(is_signature_shape(sig));
            let keys = Keys(vec![(b'a', secret.clone())]);
            prop_assert_eq!(verify(&keys, &id, &port, &exp, sig, expires), Ok(()));
            prop_assert_eq!(verify(&keys, &id, &port, &exp, sig, expires - 1), Ok(()));
            prop_assert_eq!(verify(&keys, &format!("{id}x"), &port, &exp, sig, 0), Err(SignatureError::Mismatch));
            // Another secret under the same key id does not verify it (the 32-bit signature
            // could collide once in 2^32 cases; proptest tries a few hundred).
            prop_assume!(other != secret);
            let others = Keys(vec![(b'a', other)]);
            prop_assert_eq!(verify(&others, &id, &port, &exp, sig, expires), Err(SignatureError::Mismatch));
        }

        #[test]
        fn parse_b36_never_panics(s in "\\PC{0,20}") {
            let _ = parse_b36(&s);
        }
    }
}
