#![no_main]

//! libFuzzer target: see [`faultline_fuzz::handshake`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| faultline_fuzz::handshake(data));
