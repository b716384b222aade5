//! Ethernet: the addresses of a frame.

use super::access::PacketRead;
use super::header::EthHdr;

/// Destination and source MAC of the frame, if it holds a whole Ethernet header.
#[inline(always)]
pub fn eth_addrs<P: PacketRead + ?Sized>(p: &P) -> Option<([u8; 6], [u8; 6])> {
    let eth: EthHdr = p.load(0)?;
    Some((eth.dst, eth.src))
}
