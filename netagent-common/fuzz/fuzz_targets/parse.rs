//! Fuzz target `parse`: any bytes as an Ethernet frame through the shared
//! parser (`netagent_common::packet::check::check_parse`): no panic, the outcome
//! and every field equal the reference parser's, and a packet whose readable
//! part is cut short never parses to different fields.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netagent_common::packet::check::check_parse;

fuzz_target!(|data: &[u8]| {
    check_parse(data);
});
