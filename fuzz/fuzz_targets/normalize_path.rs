#![no_main]

//! HTTP request-target normalization (first byte: options).
libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_proxy::fuzzing::normalize(data));
