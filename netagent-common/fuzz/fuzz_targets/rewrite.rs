//! Fuzz target `rewrite`: 7 parameter bytes (new address, new port, which side,
//! options) then a frame. A frame that parses as translatable, or as an ICMP
//! error quoting a translatable datagram, gets valid checksums and the
//! datapath's rewrite in software (`netagent_common::packet::check::check_rewrite`):
//! the IPv4 and L4 checksums must verify from scratch afterwards (UDP checksum 0
//! stays 0, a quoted header stays valid) and only the rewritten fields and
//! checksums may change.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netagent_common::packet::check::{RewriteParams, check_rewrite};

fuzz_target!(|data: &[u8]| {
    if let Some((params, frame)) = RewriteParams::split(data) {
        check_rewrite(&params, frame);
    }
});
