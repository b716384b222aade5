//! Address classification (addresses in network order, as read from packets).

/// Multicast (224.0.0.0/4), reserved (240.0.0.0/4) or the limited broadcast:
/// never translated, left to the namespace's own stack.
#[inline(always)]
pub fn is_multicast_or_broadcast(addr: u32) -> bool {
    let first_octet = addr.to_ne_bytes()[0];
    first_octet >= 224 || addr == u32::MAX
}
