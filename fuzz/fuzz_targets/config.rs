#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| uplinkd::fuzzing::config(data));
