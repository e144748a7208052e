//! Bounds on policy input, checked before any YAML becomes a tree in memory.
//!
//! A policy file is untrusted text (the admin API takes it from the network). Without bounds a
//! 70 KB file of nested aliases (`a: &a [x, x, ...]`, `b: &b [*a, *a, ...]`, ...) expands to
//! ~10^8 nodes when deserialized, and an unbounded file or request is unbounded memory. So:
//! a file may be at most [`MAX_FILE_BYTES`], an admin request body at most
//! [`MAX_REQUEST_BYTES`], a directory at most [`MAX_FILES`] files, and a file may expand to at
//! most [`MAX_NODES`] YAML nodes, counting an alias every time it is used. The count walks the
//! document with a visitor that allocates nothing and stops at the budget, so a bomb costs
//! milliseconds. Parsing and validation run on a blocking thread
//! ([`super::PolicySet::from_files_blocking`]), never on the async runtime.

use std::cell::Cell;
use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor,
};

/// Largest policy file, bytes.
pub const MAX_FILE_BYTES: usize = 4 << 20;

/// Largest admin API request body, bytes (a batch of files, JSON-encoded).
pub const MAX_REQUEST_BYTES: usize = 16 << 20;

/// Most policy files in a set.
pub const MAX_FILES: usize = 1000;

/// Most YAML nodes one file may expand to (aliases counted at every use).
pub const MAX_NODES: usize = 1_000_000;

/// Checks `text`'s size and expanded node count; the error is a reason for the user.
pub fn check(text: &str) -> Result<(), String> {
    if text.len() > MAX_FILE_BYTES {
        return Err(format!(
            "file is {} bytes, more than the {MAX_FILE_BYTES}-byte limit",
            text.len()
        ));
    }
    let left = Cell::new(MAX_NODES);
    match (Budget { left: &left }).deserialize(serde_yaml::Deserializer::from_str(text)) {
        Ok(()) => Ok(()),
        Err(e) if left.get() == 0 => Err(format!(
            "expands to more than {MAX_NODES} YAML nodes (aliases count each time they are used): {e}"
        )),
        // Syntax errors are reported by the real parse, with their line.
        Err(_) => Ok(()),
    }
}

/// Walks any YAML value, spending one unit of `left` per node.
#[derive(Clone, Copy)]
struct Budget<'a> {
    left: &'a Cell<usize>,
}

impl Budget<'_> {
    fn take<E: de::Error>(self) -> Result<(), E> {
        match self.left.get() {
            0 => Err(E::custom("YAML node budget exhausted")),
            n => {
                self.left.set(n - 1);
                Ok(())
            }
        }
    }
}

impl<'de> DeserializeSeed<'de> for Budget<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Budget<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.take()
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.take()
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.take()
    }

    fn visit_i128<E: de::Error>(self, _: i128) -> Result<(), E> {
        self.take()
    }

    fn visit_u128<E: de::Error>(self, _: u128) -> Result<(), E> {
        self.take()
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.take()
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.take()
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<(), E> {
        self.take()
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.take()
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.take()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.take()?;
        self.deserialize(d)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.take()?;
        self.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.take()?;
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.take()?;
        while map.next_key_seed(self)?.is_some() {
            map.next_value_seed(self)?;
        }
        Ok(())
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        // A tagged value (`!tag value`): the tag, then its value.
        self.take()?;
        let ((), variant) = data.variant_seed(self)?;
        variant.newtype_variant_seed(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A base list of `base` scalars, then `levels` levels of `width` aliases of the level
    /// below: base * width^levels leaves from a file of ~2*base + levels*width*5 bytes. Few
    /// alias uses, so serde_yaml's own repetition limit (events x 100) does not catch it.
    fn alias_bomb(base: usize, levels: usize, width: usize) -> String {
        let mut text = format!("a0: &a0 [{}]\n", vec!["x"; base].join(","));
        for level in 1..=levels {
            let refs = vec![format!("*a{}", level - 1); width].join(",");
            text.push_str(&format!("a{level}: &a{level} [{refs}]\n"));
        }
        text
    }

    #[test]
    fn an_alias_bomb_is_refused_quickly() {
        // 20,000 x 100 x 100 = 2 x 10^8 nodes from ~42 KB.
        let bomb = alias_bomb(20_000, 2, 100);
        assert!(bomb.len() < 70_000, "{}", bomb.len());
        let started = std::time::Instant::now();
        let e = check(&bomb).unwrap_err();
        assert!(e.contains("more than 1000000 YAML nodes"), "{e}");
        // Not a timing assertion on the machine's speed: the budget bounds the work.
        eprintln!("refused in {:?}", started.elapsed());
    }

    #[test]
    fn ordinary_files_and_modest_aliases_pass() {
        assert!(check("services:\n  - name: a\n    endpoints: [{address: 127.0.0.1:1}]\n").is_ok());
        assert!(
            check(&alias_bomb(10, 2, 10)).is_ok(),
            "1,000 leaves is fine"
        );
        assert!(check("").is_ok());
        assert!(check("a: !tag {b: 1}\n").is_ok());
        // A syntax error is left to the parser, which names the line.
        assert!(check("a: [\n").is_ok());
    }

    #[test]
    fn oversized_files_are_refused() {
        let big = "#".repeat(MAX_FILE_BYTES + 1);
        assert!(check(&big).unwrap_err().contains("bytes"));
    }
}
