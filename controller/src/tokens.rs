//! Random tokens: 24 bytes from the operating system, URL-safe base64 (32 characters).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

pub fn generate() -> String {
    let mut bytes = [0u8; 24];
    if let Err(e) = getrandom::fill(&mut bytes) {
        // Without an entropy source no token is safe; stopping is the only correct answer.
        panic!("operating system random source unavailable: {e}");
    }
    URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_are_32_url_safe_chars_and_differ() {
        let (a, b) = (super::generate(), super::generate());
        assert_eq!(a.len(), 32);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
        assert_ne!(a, b);
    }
}
