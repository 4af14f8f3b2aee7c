//! libFuzzer's driver for the `request` target of remapblk-fuzz (fuzz/src/targets/).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| remapblk_fuzz::targets::request::run(data));
