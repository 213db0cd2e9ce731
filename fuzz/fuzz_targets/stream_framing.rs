#![no_main]
//! Fuzz target: the body is `turnpike::fuzzing::stream_framing`, shared with the property tests.
libfuzzer_sys::fuzz_target!(|data: &[u8]| turnpike::fuzzing::stream_framing(data));
