//! libFuzzer's driver for the `control` target of remapblk-fuzz (fuzz/src/targets/).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| remapblk_fuzz::targets::control::run(data));
