#![no_main]
//! Fuzz target: the body is `turnpike::fuzzing::channel_data`, shared with the property tests.
libfuzzer_sys::fuzz_target!(|data: &[u8]| turnpike::fuzzing::channel_data(data));
