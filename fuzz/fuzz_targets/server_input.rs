#![no_main]
//! Fuzz target: the body is `turnpike::fuzzing::server_input`, shared with the property tests.
libfuzzer_sys::fuzz_target!(|data: &[u8]| turnpike::fuzzing::server_input(data));
