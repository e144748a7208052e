#![no_main]

//! A DiscoveryResponse (protobuf) merged and built into a proxy Snapshot.
libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_proxy::fuzzing::snapshot(data));
