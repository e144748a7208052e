#![no_main]

//! SPIFFE ID parsing and the invariants of an accepted ID.
libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_spiffe::fuzzing::parse_never_panics(data));
