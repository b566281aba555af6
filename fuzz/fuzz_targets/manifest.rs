#![no_main]

//! libFuzzer target: see [`faultline_fuzz::manifest`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| faultline_fuzz::manifest(data));
