#![no_main]

//! Protocol detection of a connection's first bytes (TLS ClientHello + SNI, h2, HTTP/1).
libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_proxy::fuzzing::detect(data));
