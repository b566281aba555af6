#![no_main]

//! libFuzzer target: see [`faultline_fuzz::frame_decode`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| faultline_fuzz::frame_decode(data));
