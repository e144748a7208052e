#![no_main]

//! Policy YAML (up to 3 files split on NUL): parse, validate, compile.
libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_control::fuzzing::policy(data));
