#![no_main]
//! Fuzz target: the body is `turnpike::fuzzing::stun_decode`, shared with the property tests.
libfuzzer_sys::fuzz_target!(|data: &[u8]| turnpike::fuzzing::stun_decode(data));
