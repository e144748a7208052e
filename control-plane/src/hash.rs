//! Stable content hashing for versions.
//!
//! Versions must be identical across restarts and machines for identical input, so they use
//! FNV-1a 64 (fixed, seedless) rather than `std`'s randomly seeded hasher.

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// An incremental FNV-1a 64 hasher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StableHasher(u64);

impl Default for StableHasher {
    fn default() -> Self {
        Self(FNV_OFFSET)
    }
}

impl StableHasher {
    /// A hasher in its initial state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds raw bytes.
    pub fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(FNV_PRIME);
        }
    }

    /// Feeds a length-prefixed field, so that `("ab", "c")` and `("a", "bc")` hash differently.
    pub fn write_field(&mut self, bytes: &[u8]) {
        self.write(&(bytes.len() as u64).to_le_bytes());
        self.write(bytes);
    }

    /// The hash.
    pub fn finish(&self) -> u64 {
        self.0
    }

    /// The hash as 16 lower-case hex digits.
    pub fn finish_hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_fnv1a_values() {
        let mut h = StableHasher::new();
        h.write(b"a");
        assert_eq!(h.finish_hex(), "af63dc4c8601ec8c");
        assert_eq!(StableHasher::new().finish_hex(), "cbf29ce484222325");
    }

    #[test]
    fn fields_are_length_prefixed() {
        let mut a = StableHasher::new();
        a.write_field(b"ab");
        a.write_field(b"c");
        let mut b = StableHasher::new();
        b.write_field(b"a");
        b.write_field(b"bc");
        assert_ne!(a.finish_hex(), b.finish_hex());
    }
}
