//! Fuzzes the gateway's request parsing: an input is a new model name, a 0xFF byte, and a
//! request body (or a body alone); see `fuzz_props` for the properties checked.
#![no_main]

#[path = "../../gateway/tests/it/fuzz_props.rs"]
mod fuzz_props;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (new_name, body) = fuzz_props::split_input(data);
    fuzz_props::check_request(body, &new_name);
    // Backend error bodies arrive with any status; derive one from the input.
    let status = 400 + u16::from(data.first().copied().unwrap_or(0)) % 200;
    fuzz_props::check_backend_error(status, body);
});
